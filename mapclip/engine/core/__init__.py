"""The facts every front end shares, standard library only: options and their
checks (options), errors worded per front end (errors), jobs with progress,
cancel and atomic outputs (jobs), every output's fields and writers (outputs);
and the named fault points the reliability tests crash runs at (faults)."""
