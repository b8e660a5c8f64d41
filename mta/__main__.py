"""``python -m mta --config PATH``."""

import sys

from mta.cli.daemon import main

sys.exit(main())
