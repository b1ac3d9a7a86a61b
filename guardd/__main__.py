"""`python -m guardd`."""

import sys

from guardd.cli import main

sys.exit(main())
