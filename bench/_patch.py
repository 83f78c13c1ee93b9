"""Editing a real program's source the way a user would (the ``*_trial.py`` scripts)."""
from __future__ import annotations

from typing import Callable


def replace_once(old: str, new: str, text: str, where: str) -> str:
    """``text`` with the first ``old`` replaced by ``new``; a clear exit when ``old`` is not
    there (the program changed upstream). ``where``: "script: file" for the message."""
    if old not in text:
        raise SystemExit(f"{where} changed; cannot find {old.strip()[:60]!r}")
    return text.replace(old, new, 1)


def editor(where: str) -> Callable[[str, str, str], str]:
    """:func:`replace_once` for one file: ``sub(old, new, text)``."""
    return lambda old, new, text: replace_once(old, new, text, where)
