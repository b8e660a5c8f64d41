"""Kept so ``python -m mta.cli.mtactl`` keeps working; the verbs live in :mod:`mta.cli.ctl`."""

import sys

from mta.cli.ctl import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
