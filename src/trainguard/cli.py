"""``trainguard`` command line: demo, zoo, doctor, report, replay.

Each subcommand lives in its own module, which exposes ``add_arguments(parser)`` and
``run(args) -> int``; the module is imported only when its subcommand runs.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

SUBCOMMANDS = {
    "demo": ("trainguard.demo", "a real model that dies bare and survives guarded, side by side"),
    "zoo": ("trainguard.zoo.runner", "run the stability zoo: pathological and healthy runs, scored"),
    "doctor": ("trainguard.doctor.cli", "diagnose a model: module:factory -> findings and prescriptions"),
    "report": ("trainguard.report.html", "an HTML report of a guarded run from its JSONL log"),
    "replay": ("trainguard.locate", "re-run a reproducer bundle and print where the first NaN/Inf came from"),
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="trainguard", description=__doc__.splitlines()[0])
    from . import __version__
    parser.add_argument("--version", action="version", version=f"trainguard {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    argv = list(sys.argv[1:] if argv is None else argv)
    chosen = next((a for a in argv if not a.startswith("-")), None)
    modules = {}
    for name, (modname, help_) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        if name == chosen:
            modules[name] = importlib.import_module(modname)
            modules[name].add_arguments(p)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return int(modules[args.command].run(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
