"""`python -m fxopt` runs the command line."""

import sys

from fxopt.cli import main

sys.exit(main())
