"""``python -m savevm.cli``."""

import sys

from savevm.cli import main

sys.exit(main())
