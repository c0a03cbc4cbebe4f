"""`python -m ctscan ...` is `ctscan ...`."""

import sys

from ctscan.cli import main

sys.exit(main())
