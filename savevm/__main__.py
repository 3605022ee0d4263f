"""``python -m savevm``: the ``savevm`` command."""

import sys

from savevm.cli import main

sys.exit(main())
