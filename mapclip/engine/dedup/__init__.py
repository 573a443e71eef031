"""Near-duplicate images by perceptual hash (engine.dedup.duplicates): find, report,
quarantine and undo. Training-data hygiene; it never touches an index."""
