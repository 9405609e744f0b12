"""``python -m treeopt``: the same command line as ``treeopt``."""

from treeopt.cli import console_main

console_main()
