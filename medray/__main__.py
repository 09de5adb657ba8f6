"""`python -m medray ...`: the same as the `medray` command."""

import sys

from medray.cli import main

sys.exit(main())
