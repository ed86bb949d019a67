"""`python -m lakehouse.cli`: the same as the `lakehouse` console script."""

import sys

from lakehouse.entry import main

sys.exit(main())
