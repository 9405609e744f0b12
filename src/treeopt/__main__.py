"""``python -m treeopt``: the same command line as ``treeopt``."""

import sys

from treeopt.cli import main

sys.exit(main())
