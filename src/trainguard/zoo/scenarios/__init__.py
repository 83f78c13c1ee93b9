"""Zoo scenarios: importing this package registers every scenario module in it.

Each module calls ``zoo.base.register(Scenario(...))`` at import time; modules whose name
starts with "_" hold shared helpers and register nothing.
"""
from __future__ import annotations

import importlib
import pkgutil

for _m in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if not _m.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_m.name}")
