import sys

from mta.cli.ctl import main

sys.exit(main())
