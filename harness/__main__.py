"""`python -m harness VERB ...` (see harness/cli.py)."""

import sys

from harness.cli import main

sys.exit(main())
