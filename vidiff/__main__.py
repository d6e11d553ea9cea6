"""``python -m vidiff``: the ``vidiff`` command, for an environment whose scripts folder is not on PATH."""
import sys

from vidiff.cli import main

sys.exit(main())
