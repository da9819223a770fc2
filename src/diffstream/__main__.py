"""`python -m diffstream` is the `diffstream` command."""

import sys

from diffstream.cli import main

sys.exit(main())
