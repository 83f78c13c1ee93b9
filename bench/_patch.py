"""Editing a real program's source the way a user would (the ``*_trial.py`` scripts)."""
from __future__ import annotations


def replace_once(old: str, new: str, text: str, where: str) -> str:
    """``text`` with the first ``old`` replaced by ``new``; a clear exit when ``old`` is not
    there (the program changed upstream). ``where``: "script: file" for the message."""
    if old not in text:
        raise SystemExit(f"{where} changed; cannot find {old.strip()[:60]!r}")
    return text.replace(old, new, 1)
