"""`python -m dicomnode` runs the command line."""

import sys

from dicomnode.cli import main

sys.exit(main())
