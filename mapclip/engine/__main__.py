"""`python -m engine ...`: the MapCLIP command line."""
import sys

from .cli import main

sys.exit(main())
