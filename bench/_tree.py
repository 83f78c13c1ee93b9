"""Which trainguard a benchmark script imports: this checkout's ``src/``, or another tree's
(``--src DIR``, to compare two versions on one machine). Called before ``import trainguard``."""
from __future__ import annotations

import os
import sys


def use_tree(argv: list[str] | None = None) -> str:
    """Put the chosen ``src/`` first on ``sys.path`` and return it."""
    argv = sys.argv if argv is None else argv
    src = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")
    if "--src" in argv[:-1]:
        src = argv[argv.index("--src") + 1]
    sys.path.insert(0, src)
    return src
