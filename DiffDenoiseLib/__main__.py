"""`python -m DiffDenoiseLib` runs the command line."""

import sys

from DiffDenoiseLib.cli import main

sys.exit(main())
