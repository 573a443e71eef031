"""``python -m engine VERB ...`` runs ``python -m mapclip.engine VERB ...``."""
import sys

from mapclip.engine.cli import main

if __name__ == "__main__":
    sys.exit(main())
