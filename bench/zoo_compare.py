"""Two zoo runs compared record by record (what changed between the code before and after).

    python bench/zoo_compare.py BEFORE.json AFTER.json

Both files are written by ``trainguard zoo ... --json PATH`` (a list of records, one per scenario
and seed). Records are matched by (scenario, seed); fields whose names hold "second", "time"
or "overhead" (timings) are left out. Every record that differs is printed with the fields that differ, then the count;
the scores of ``PATH.totals.json`` beside each file are compared the same way when both exist.
"""
from __future__ import annotations

import argparse
import json
import os
from typing import Any

SKIP = ("second", "time", "overhead")


def strip(o: Any) -> Any:
    if isinstance(o, dict):
        return {k: strip(v) for k, v in o.items() if not any(t in k for t in SKIP)}
    if isinstance(o, list):
        return [strip(v) for v in o]
    return o


def records(path: str) -> dict[tuple[str, int], dict]:
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if isinstance(data, dict) and "records" in data:
        data = data["records"]
    if not isinstance(data, list) or not all(isinstance(r, dict) and "scenario" in r for r in data):
        raise SystemExit(f"zoo_compare: {path} is not a zoo --json file (a list of records)")
    return {(r["scenario"], r["seed"]): r for r in data}


def short(v: Any) -> str:
    s = json.dumps(v)
    return s if len(s) <= 200 else s[:197] + "..."


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("before")
    ap.add_argument("after")
    a = ap.parse_args()
    old, new = records(a.before), records(a.after)
    differ = 0
    for key in sorted(set(old) | set(new)):
        if key not in old or key not in new:
            print(f"{'only after' if key in new else 'only before'}: {key[0]} seed {key[1]}")
            differ += 1
            continue
        x, y = strip(old[key]), strip(new[key])
        if x == y:
            continue
        differ += 1
        print(f"{key[0]} seed {key[1]}:")
        for f in sorted(set(x) | set(y)):
            if x.get(f) != y.get(f):
                print(f"    {f}: {short(x.get(f))} -> {short(y.get(f))}")
    print(f"{len(new)} records after, {len(old)} before; {differ} differ")
    totals = [p[:-len(".json")] + ".totals.json" for p in (a.before, a.after)]
    if all(os.path.exists(p) for p in totals):
        t = []
        for p in totals:
            with open(p, encoding="utf-8") as f:
                d = json.load(f)
            t.append(strip(d[0] if isinstance(d, list) else d))
        changed = {k: (t[0].get(k), t[1].get(k)) for k in sorted(set(t[0]) | set(t[1]))
                   if t[0].get(k) != t[1].get(k) and "wall" not in k}
        print("scores: " + ("unchanged" if not changed else
                            "; ".join(f"{k} {b} -> {c}" for k, (b, c) in changed.items())))


if __name__ == "__main__":
    main()
