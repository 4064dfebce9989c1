"""``python -m central``: see central/cli.py."""

import sys

from central.cli import main

sys.exit(main())
