"""The run report: one self-contained HTML file of a guarded run.

    trainguard report events.jsonl -o run.html        # from a Guard's log= file
    guard.save_html("run.html")                       # from a live or closed Guard

What it shows: the loss and gradient-norm curves on a log scale with every non-finite step
marked as such (a red tick on the top edge, never dropped, never drawn as 0), a numbered marker
for every finding and action (hover for the message; each links to its row in the table), the
rollbacks drawn as jumps back, the effective learning rate over time, a per-module gradient-norm
heat map over time (non-finite cells in magenta), the halt story and the prescriptions, and a
table of every finding and action (runs of consecutive clips folded into one row with their
count).

Long runs: the statistics are read in one streaming pass into bins whose width doubles whenever
there are more than :data:`MAX_BINS` of them, each bin keeping the minimum, the maximum and the
count of non-finite values (so a single NaN among a million steps still shows); the events are
all kept. Plots are PNG images made with matplotlib (the ``report`` extra) and embedded as
``data:`` URIs; the hover markers are an HTML image map (no script, nothing fetched at view
time). Every string from the run (module names, messages) is HTML-escaped.
"""
from __future__ import annotations

import base64
import html
import io
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Iterable

#: bins per curve and heat-map column before the bin width doubles (a 1,200-pixel-wide plot
#: cannot show more)
MAX_BINS = 1200
#: modules drawn in the heat map (the largest gradient norms first beyond that)
MAX_MODULES = 60

_NONFINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def _f(x: Any) -> float:
    if x is None:
        return math.nan
    if isinstance(x, str):
        return _NONFINITE.get(x, math.nan)
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan


class _Binned:
    """min / max / last / non-finite count of a series per bin of ``width`` steps; the width
    doubles (pairs of bins merged) whenever there are more than ``2 * MAX_BINS`` bins."""

    def __init__(self) -> None:
        self.width = 1
        self.bins: dict[int, list[float]] = {}  # bin -> [min, max, nonfinite_count, step_of_nonfinite]

    def add(self, step: int, v: float) -> None:
        b = step // self.width
        cur = self.bins.get(b)
        if cur is None:
            cur = self.bins[b] = [math.inf, -math.inf, 0.0, -1.0]
            if len(self.bins) > 2 * MAX_BINS:
                self._coarsen()
                b = step // self.width
                cur = self.bins[b]
        if math.isfinite(v):
            if v < cur[0]:
                cur[0] = v
            if v > cur[1]:
                cur[1] = v
        else:
            cur[2] += 1
            if cur[3] < 0:
                cur[3] = float(step)

    def _coarsen(self) -> None:
        self.width *= 2
        merged: dict[int, list[float]] = {}
        for b, (lo, hi, n, at) in self.bins.items():
            m = merged.setdefault(b // 2, [math.inf, -math.inf, 0.0, -1.0])
            m[0], m[1], m[2] = min(m[0], lo), max(m[1], hi), m[2] + n
            if m[3] < 0 <= at:
                m[3] = at
        self.bins = merged

    def series(self) -> tuple[list[float], list[float], list[float], list[float]]:
        """x (bin start), lo, hi (NaN where the bin had no finite value), non-finite steps."""
        xs, lo, hi, bad = [], [], [], []
        for b in sorted(self.bins):
            l, h, n, at = self.bins[b]
            xs.append(float(b * self.width))
            lo.append(l if math.isfinite(l) else math.nan)
            hi.append(h if math.isfinite(h) else math.nan)
            if n:
                bad.append(at)
        return xs, lo, hi, bad


class _Heat:
    """Per-module gradient norms binned like :class:`_Binned` (the maximum of log10 per bin;
    a non-finite value marks the cell)."""

    def __init__(self) -> None:
        self.width = 1
        self.modules: dict[str, int] = {}
        self.cells: dict[int, dict[int, float]] = {}  # bin -> module index -> max log10 (inf = bad)

    def add(self, step: int, modules: Iterable[str], norms: Iterable[Any]) -> None:
        b = step // self.width
        row = self.cells.get(b)
        if row is None:
            row = self.cells[b] = {}
            if len(self.cells) > 2 * MAX_BINS:
                self._coarsen()
                b = step // self.width
                row = self.cells[b]
        for m, g in zip(modules, norms):
            i = self.modules.setdefault(m, len(self.modules))
            v = _f(g)
            lv = math.inf if not math.isfinite(v) else (math.log10(v) if v > 0 else -12.0)
            if lv > row.get(i, -math.inf):
                row[i] = lv

    def _coarsen(self) -> None:
        self.width *= 2
        merged: dict[int, dict[int, float]] = {}
        for b, row in self.cells.items():
            m = merged.setdefault(b // 2, {})
            for i, v in row.items():
                if v > m.get(i, -math.inf):
                    m[i] = v
        self.cells = merged


@dataclass
class RunData:
    """Everything the report draws, read from a JSONL log or a Guard."""

    source: str = ""
    stats_records: int = 0
    first_step: int | None = None
    last_step: int = -1
    loss: _Binned = field(default_factory=_Binned)
    grad: _Binned = field(default_factory=_Binned)
    lr: _Binned = field(default_factory=_Binned)
    heat: _Heat = field(default_factory=_Heat)
    findings: list[dict[str, Any]] = field(default_factory=list)
    actions: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    summary: str = ""
    story: str = ""
    #: how many runs the log holds (one per Guard that appended to it) and which this is
    runs_in_log: int = 1
    run_index: int = 1

    def add_stats(self, d: dict[str, Any]) -> None:
        step = int(d.get("step", 0))
        self.stats_records += 1
        self.first_step = step if self.first_step is None else min(self.first_step, step)
        self.last_step = max(self.last_step, step)
        if d.get("loss_known", True):
            self.loss.add(step, _f(d.get("loss")))
        self.grad.add(step, _f(d.get("grad_norm")))
        lr = d.get("lr")
        if lr is not None:
            self.lr.add(step, _f(lr))
        mods, norms = d.get("modules") or (), d.get("grad_norms") or ()
        if mods:
            self.heat.add(step, mods, norms)

    def add(self, d: dict[str, Any]) -> None:
        """One event of a trainguard JSONL log."""
        kind = d.get("type")
        if kind == "stats":
            self.add_stats(d)
        elif kind == "finding":
            self.findings.append(d)
        elif kind == "action":
            self.actions.append(d)
        elif kind == "summary":
            self.summary = str(d.get("text", ""))
        elif kind == "story":
            self.story = str(d.get("text", ""))
            self.events.append(d)
        elif kind is not None:
            self.events.append(d)
        step = d.get("step")
        if isinstance(step, int):
            self.last_step = max(self.last_step, step)

    @classmethod
    def from_jsonl(cls, path: str | os.PathLike, run: int | None = None) -> "RunData":
        """The run at ``path``; a log that several Guards appended to (each opened it with a
        ``run_start`` line) holds several runs: the last is read, or the ``run``-th (1-based).
        A ``run_start`` followed by ``run_resumed`` (a Guard restored from a saved state)
        continues the run before it. One pass, one run kept in memory."""
        from ..sinks.jsonl import raw_events
        src = os.fspath(path)
        if run is not None and (isinstance(run, bool) or not isinstance(run, int) or run < 1):
            raise ValueError(f"run must be a positive run number (1 = the first), got {run!r}")
        runs = 0
        cur: RunData | None = None
        chosen: RunData | None = None
        pending = False  # a run_start seen: the next event tells a new run from a resumed one
        keep = True  # the run being read is the one asked for (the others are only counted)
        for d in raw_events(path):  # not decoded: the few numbers drawn are read with _f
            kind = d.get("type")
            if kind == "run_start":
                pending = True
                continue
            if pending:
                pending = False
                if not (kind == "run_resumed" and cur is not None):
                    if cur is not None and run == runs:
                        chosen = cur
                    runs += 1
                    cur = cls(source=src)
                    keep = run is None or run == runs
            if cur is None:  # a log written before run markers: one run
                runs, cur = 1, cls(source=src)
                keep = run is None or run == 1
            if keep:
                cur.add(d)
        if cur is None:
            runs, cur = max(runs, 1), cls(source=src)
        if run is not None and run == runs:
            chosen = cur
        out = chosen if run is not None else cur
        if out is None:
            raise ValueError(f"{src} holds {runs} run(s); there is no run {run}")
        out.runs_in_log, out.run_index = runs, (run if run is not None else runs)
        return out

    @classmethod
    def from_guard(cls, guard: Any) -> "RunData":
        """From a Guard's log file when it has one (every event), else from its memory (the
        last 2,000 steps' statistics and the kept findings and actions)."""
        from ..sinks.jsonl import JsonlSink, encode
        logs = [s for s in guard.core.sinks if isinstance(s, JsonlSink)]
        if logs:
            if not logs[0]._fh.closed:
                logs[0]._fh.flush()
            run = cls.from_jsonl(logs[0].path)
            if not run.summary:
                run.summary = guard.summary()
            return run
        run = cls(source="memory")
        from dataclasses import asdict
        for s in guard.core.history:
            run.add_stats(encode(asdict(s)))
        run.findings = [encode(f.to_dict()) for f in guard.core.findings]
        run.actions = [encode(a.to_dict()) for a in guard.core.actions]
        run.last_step = max(run.last_step, guard.core.step_count - 1)
        run.summary = guard.summary()
        run.story = guard.core.halt_story
        return run


# ---------------------------------------------------------------------------------- drawing
def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _png(fig: Any, dpi: int) -> str:
    import matplotlib.pyplot as plt
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


@dataclass
class _Marker:
    step: int
    anchor: str
    title: str
    color: str
    x: int = 0  # pixel position on the loss plot (image-map coordinates)
    y: int = 0


def _markers(run: RunData) -> list[_Marker]:
    """A marker per finding and per action (clips excepted: they are a rug of their own)."""
    out = []
    n = 0
    for d in sorted(run.findings + [a for a in run.actions if a.get("kind") != "clip"],
                    key=lambda d: int(d.get("step", 0))):
        n += 1
        is_f = "message" in d
        text = (f"step {d.get('step')}: {'finding' if is_f else 'action'} {d.get('kind')}"
                + (f" in {d.get('where')}" if d.get("where") else "") + ": "
                + str(d.get("message") if is_f else d.get("reason", "")))
        color = {"critical": "#b3261e", "warning": "#e8a317", "info": "#3b7dd8"}.get(
            str(d.get("severity")), "#b3261e") if is_f else {
            "skip": "#7b3fa0", "rollback": "#0b7a75", "lr_backoff": "#2f5fb3",
            "halt": "#000000"}.get(str(d.get("kind")), "#555555")
        d["_anchor"] = f"ev{n}"
        out.append(_Marker(int(d.get("step", 0)), f"ev{n}", text, color))
    return out


def _plots(run: RunData) -> dict[str, tuple[str, str, int, int]]:
    """name -> (data URI, image-map areas HTML, width px, height px)."""
    try:
        import matplotlib
        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
        from matplotlib import colormaps
    except Exception:  # matplotlib is an optional extra
        return {}
    dpi = 90
    out: dict[str, tuple[str, str, int, int]] = {}
    markers = _markers(run)
    x_lo = run.first_step if run.first_step is not None else 0
    x_hi = max(run.last_step, x_lo + 1)

    def curve(ax: Any, b: _Binned, color: str, label: str, steps: bool = False) -> list[float]:
        xs, lo, hi, bad = b.series()
        if xs:
            mid = [math.sqrt(a * c) if a > 0 and c > 0 else (a if math.isfinite(a) else c)
                   for a, c in zip(lo, hi)]
            if b.width > 1:
                ax.fill_between(xs, lo, hi, color=color, alpha=0.25, linewidth=0, step="post")
            ax.plot(xs, mid if b.width > 1 else hi, color=color, lw=1.2, label=label,
                    drawstyle="steps-post" if steps else "default")
        for i, s in enumerate(bad):
            ax.axvline(s, ymin=0.93, ymax=1.0, color="#d62728", lw=1.6,
                       label="non-finite (NaN/Inf)" if i == 0 else None)
        return xs

    def logy(ax: Any, b: _Binned) -> None:
        vals = [v for lo, hi, _n, _a in b.bins.values() for v in (lo, hi) if math.isfinite(v)]
        if vals and min(vals) > 0:
            ax.set_yscale("log")
        elif vals and min(vals) <= 0 < max(vals):
            ax.set_yscale("symlog", linthresh=max(1e-6, min(abs(v) for v in vals if v) if any(vals) else 1))

    def finish(fig: Any, ax: Any, title: str) -> tuple[str, str, int, int]:
        """A step-axis plot's common dress, then the PNG (no image map)."""
        ax.set_xlim(x_lo, x_hi)
        ax.set_title(title, fontsize=11)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper right")
        fig.tight_layout()
        fig.canvas.draw()
        w, h = fig.canvas.get_width_height()
        return _png(fig, dpi), "", w, h

    # 1. loss with findings, actions, rollbacks
    fig, ax = plt.subplots(figsize=(12, 4.2), dpi=dpi)
    curve(ax, run.loss, "#1f77b4", "loss" + (f" (min-max per {run.loss.width} steps)" if run.loss.width > 1 else ""))
    logy(ax, run.loss)
    ax.set_xlim(x_lo, x_hi)
    ax.set_title("loss", fontsize=11)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    for a in run.actions:
        if a.get("kind") == "rollback":
            to = (a.get("detail") or {}).get("to_step")
            if isinstance(to, (int, float)):
                ax.annotate("", xy=(to, 0.12), xytext=(a.get("step", 0), 0.12),
                            xycoords=("data", "axes fraction"),
                            arrowprops=dict(arrowstyle="->", color="#0b7a75", lw=1.8,
                                            connectionstyle="arc3,rad=0.35"))
        elif a.get("kind") == "halt":
            ax.axvline(a.get("step", 0), color="black", lw=2.2, label="halt")
    for m in markers:
        ax.plot([m.step], [0.04], marker="v", ms=8, color=m.color, transform=ax.get_xaxis_transform(),
                clip_on=False)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.canvas.draw()
    w, h = fig.canvas.get_width_height()
    areas = []
    clusters: list[list[_Marker]] = []
    for m in markers:
        x_px = ax.get_xaxis_transform().transform((m.step, 0.04))
        m.x, m.y = int(x_px[0]), int(h - x_px[1])
        if clusters and abs(clusters[-1][0].x - m.x) <= 5:
            clusters[-1].append(m)
        else:
            clusters.append([m])
    for c in clusters:
        title = "\n".join(x.title for x in c[:6]) + (f"\n... and {len(c) - 6} more" if len(c) > 6 else "")
        areas.append(f"<area shape='circle' coords='{c[0].x},{c[0].y},8' href='#{c[0].anchor}' "
                     f"title='{_e(title)}' alt='{_e(c[0].title[:80])}'>")
    out["loss"] = (_png(fig, dpi), "".join(areas), w, h)

    # 2. gradient norm with clips
    fig, ax = plt.subplots(figsize=(12, 3.4), dpi=dpi)
    curve(ax, run.grad, "#ff7f0e", "global gradient norm")
    logy(ax, run.grad)
    clips = [a.get("step", 0) for a in run.actions if a.get("kind") == "clip"]
    if clips:
        ax.plot(clips, [0.02] * len(clips), "|", color="#9467bd", ms=7,
                transform=ax.get_xaxis_transform(), label=f"clip ({len(clips)})")
    out["grad"] = finish(fig, ax, "gradient norm (before clipping)")

    # 3. learning rate
    if run.lr.bins:
        fig, ax = plt.subplots(figsize=(12, 2.6), dpi=dpi)
        curve(ax, run.lr, "#2ca02c", "effective learning rate (schedule x trainguard's scale)",
              steps=True)
        logy(ax, run.lr)
        for a in run.actions:
            if a.get("kind") == "lr_backoff":
                ax.axvline(a.get("step", 0), color="#2f5fb3", ls="--", lw=1)
        out["lr"] = finish(fig, ax, "learning rate")

    # 4. per-module gradient-norm heat map
    heat = run.heat
    if heat.cells and heat.modules:
        import numpy as np
        names = list(heat.modules)
        idx = list(range(len(names)))
        if len(idx) > MAX_MODULES:
            peak = {i: max((row.get(i, -math.inf) for row in heat.cells.values()), default=-math.inf)
                    for i in idx}
            idx = sorted(sorted(idx, key=lambda i: -peak[i])[:MAX_MODULES])
        bins = sorted(heat.cells)
        grid = np.full((len(idx), len(bins)), np.nan)
        bad = np.zeros_like(grid, dtype=bool)
        for j, b in enumerate(bins):
            row = heat.cells[b]
            for r, i in enumerate(idx):
                v = row.get(i)
                if v is None:
                    continue
                if math.isinf(v):
                    bad[r, j] = True
                else:
                    grid[r, j] = v
        fig, ax = plt.subplots(figsize=(12, max(2.4, 0.22 * len(idx) + 1.4)), dpi=dpi)
        cmap = colormaps["viridis"].with_extremes(bad="#f2f2f2")
        x0, x1 = bins[0] * heat.width, (bins[-1] + 1) * heat.width
        im = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap=cmap, interpolation="nearest",
                       extent=(x0, x1, len(idx) - 0.5, -0.5))
        if bad.any():
            from matplotlib.colors import ListedColormap
            over = np.ma.masked_where(~bad, np.ones_like(grid))
            ax.imshow(over, aspect="auto", cmap=ListedColormap(["#ff00ff"]), vmin=0, vmax=1,
                      interpolation="nearest",
                      extent=(x0, x1, len(idx) - 0.5, -0.5))
        ax.set_yticks(range(len(idx)))
        ax.set_yticklabels([names[i][-40:] for i in idx], fontsize=7)
        ax.set_xlabel("step")
        ax.set_title("per-module gradient norm, log10 (magenta: NaN/Inf; grey: not measured)",
                     fontsize=11)
        fig.colorbar(im, ax=ax, pad=0.01)
        fig.tight_layout()
        fig.canvas.draw()
        w, h = fig.canvas.get_width_height()
        out["heat"] = (_png(fig, dpi), "", w, h)
    return out


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#1a1a1a;max-width:1120px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:26px 0 8px;border-bottom:1px solid #ddd;padding-bottom:4px}
.ok{color:#1b7f3b;font-weight:600}.bad{color:#b3261e;font-weight:600}.muted{color:#666}
table{border-collapse:collapse;font-size:13px;width:100%}td,th{border:1px solid #ddd;padding:3px 6px;text-align:left;vertical-align:top}
th{background:#f4f4f4}.sev-critical{background:#fde7e6}.sev-warning{background:#fff4d6}.sev-info{background:#eef4fb}
.act{background:#f1ecf7}pre{background:#f7f7f7;padding:10px;white-space:pre-wrap;font-size:13px}
.plot{overflow-x:auto}.plot img{border:1px solid #eee;margin:6px 0}tr:target{outline:2px solid #1f77b4}
"""


def _rows(run: RunData) -> str:
    """Every finding and action, oldest first; consecutive clips folded with their count."""
    items = sorted(run.findings + run.actions, key=lambda d: int(d.get("step", 0)))
    out: list[str] = []
    clip_run: list[dict[str, Any]] = []

    def flush() -> None:
        if not clip_run:
            return
        a, b = clip_run[0].get("step"), clip_run[-1].get("step")
        span = f"{a}" if a == b else f"{a}&ndash;{b}"
        more = f" (&times;{len(clip_run)})" if len(clip_run) > 1 else ""
        out.append(f"<tr class='act'><td>{span}</td><td>action</td><td>clip{more}</td><td></td>"
                   f"<td>{_e(clip_run[-1].get('reason', ''))}</td></tr>")
        clip_run.clear()

    for d in items:
        if "message" not in d and d.get("kind") == "clip":
            clip_run.append(d)
            continue
        flush()
        anchor = f" id='{d['_anchor']}'" if "_anchor" in d else ""
        if "message" in d:
            where = d.get("where") or ""
            origin = f" (origin: {d['origin']})" if d.get("origin") else ""
            out.append(f"<tr{anchor} class='sev-{_e(d.get('severity', ''))}'><td>{_e(d.get('step'))}</td>"
                       f"<td>finding</td><td>{_e(d.get('kind'))}</td><td>{_e(where)}{_e(origin)}</td>"
                       f"<td>{_e(d.get('message', ''))}</td></tr>")
        else:
            out.append(f"<tr{anchor} class='act'><td>{_e(d.get('step'))}</td><td>action</td>"
                       f"<td>{_e(d.get('kind'))}</td><td></td><td>{_e(d.get('reason', ''))}</td></tr>")
    flush()
    return "".join(out)


def render(run: RunData, title: str = "trainguard run report") -> str:
    """The report as one HTML string."""
    plots = _plots(run)  # sets the markers' anchors the table links to
    halted = any(a.get("kind") == "halt" for a in run.actions)
    fcount: dict[str, int] = {}
    for f in run.findings:
        fcount[str(f.get("kind"))] = fcount.get(str(f.get("kind")), 0) + 1
    acount: dict[str, int] = {}
    for a in run.actions:
        acount[str(a.get("kind"))] = acount.get(str(a.get("kind")), 0) + 1
    nonfinite = sum(len(b.series()[3]) for b in (run.loss, run.grad))
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{_e(title)}</title>"
             f"<style>{_CSS}</style></head><body>", f"<h1>{_e(title)}</h1>",
             f"<p class='muted'>source: {_e(run.source)} &middot; steps "
             f"{_e(run.first_step if run.first_step is not None else 0)}&ndash;{_e(run.last_step)} "
             f"&middot; {run.stats_records} statistics records &middot; "
             f"{len(run.findings)} findings &middot; {len(run.actions)} actions"
             + (f" &middot; run {run.run_index} of the {run.runs_in_log} in this log (each Guard "
                f"appends its own; <code>trainguard report LOG --run K</code> shows run K)"
                if run.runs_in_log > 1 else "") + "</p>"]
    verdict = ("<span class='bad'>halted</span>" if halted else
               "<span class='bad'>non-finite values seen</span>" if nonfinite and not run.actions else
               "<span class='ok'>repaired and completed</span>" if run.actions else
               "<span class='ok'>no findings, no interventions</span>" if not run.findings else
               "<span class='ok'>completed</span>")
    parts.append(f"<p>Outcome: {verdict}. Findings: "
                 + (", ".join(f"{_e(k)} &times;{n}" for k, n in fcount.items()) or "none")
                 + ". Actions: " + (", ".join(f"{_e(k)} &times;{n}" for k, n in acount.items()) or "none")
                 + ".</p>")
    if run.story:
        parts.append(f"<h2>Why the run stopped</h2><pre>{_e(run.story)}</pre>")
    if not plots:
        parts.append("<p class='muted'>(install matplotlib, <code>pip install 'trainguard[report]'</code>, "
                     "for the plots)</p>")
    for key, head in (("loss", "Loss, findings and actions"), ("grad", "Gradient norm"),
                      ("lr", "Learning rate"), ("heat", "Per-module gradient norm")):
        if key in plots:
            uri, areas, w, h = plots[key]
            usemap = f" usemap='#map-{key}'" if areas else ""
            parts.append(f"<h2>{head}</h2><div class='plot'><img src='{uri}' width='{w}' height='{h}'"
                         f" alt='{_e(head)}'{usemap}>"
                         + (f"<map name='map-{key}'>{areas}</map>" if areas else "") + "</div>")
            if key == "loss":
                parts.append("<p class='muted'>Triangles: findings and actions (hover for the "
                             "message, click for its row); red ticks on the top edge: steps "
                             "with a non-finite value; green arcs: rollbacks, drawn back to the "
                             "step restored; black line: halt.</p>")
    rem: list[str] = []
    seen: set[str] = set()
    for f in run.findings:
        for r in f.get("remedies") or ():
            key = f"{f.get('kind')}: {r}"
            if key not in seen:
                seen.add(key)
                rem.append(f"<li><b>{_e(f.get('kind'))}</b>: {_e(r)}</li>")
    if rem:
        parts.append("<h2>What to change</h2><ul>" + "".join(rem[:40]) + "</ul>")
    parts.append("<h2>Findings and actions</h2>")
    if run.findings or run.actions:
        parts.append("<table><tr><th>step</th><th>type</th><th>kind</th><th>where</th>"
                     f"<th>message</th></tr>{_rows(run)}</table>")
    else:
        parts.append("<p>None.</p>")
    others = [e for e in run.events if e.get("type") not in ("story", "scaler_overflow")]
    overflow = sum(1 for e in run.events if e.get("type") == "scaler_overflow")
    if others or overflow:
        parts.append("<h2>Other events</h2><table><tr><th>step</th><th>event</th><th>detail</th></tr>")
        for e in others:
            # an event that says itself in words (a bad batch: its ids and suspects) shows
            # that line; the rest show their fields (all of them stay in the JSONL log)
            if isinstance(e.get("message"), str):
                text = e["message"]
            else:
                text = json.dumps({k: v for k, v in e.items() if k not in ("type", "step")},
                                  default=str)
            parts.append(f"<tr><td>{_e(e.get('step'))}</td><td>{_e(e.get('type'))}</td>"
                         f"<td>{_e(text)}</td></tr>")
        if overflow:
            parts.append(f"<tr><td></td><td>scaler_overflow</td><td>{overflow} fp16 loss-scaler "
                         "overflow skips (normal, not instability)</td></tr>")
        parts.append("</table>")
    if run.summary:
        parts.append(f"<h2>Summary</h2><pre>{_e(run.summary)}</pre>")
    parts.append("</body></html>")
    return "".join(parts)


def save_report(source: Any, path: str | os.PathLike, title: str | None = None,
                run: int | None = None) -> str:
    """Write the report of ``source`` (a JSONL log path, a :class:`RunData`, or a Guard / Monitor /
    Keras Guard) to ``path`` atomically; returns the path. ``run``: which run of a log that
    holds several (1-based; default the last)."""
    from .._fsio import atomic_write
    if isinstance(source, RunData):
        data = source
    elif isinstance(source, (str, os.PathLike)):
        data = RunData.from_jsonl(source, run)
    elif hasattr(source, "core"):
        data = RunData.from_guard(source)
    else:
        raise TypeError(f"save_report expects a JSONL log path, RunData or a Guard, got "
                        f"{type(source).__name__}")
    text = render(data, title or f"trainguard run report: {os.path.basename(data.source) or 'run'}")
    atomic_write(path, lambda fh: fh.write(text))
    return os.fspath(path)


# ------------------------------------------------------------------------------------ CLI
def add_arguments(p: Any) -> None:
    p.add_argument("log", help="a trainguard JSONL event log (tg.Guard(..., log='events.jsonl'))")
    p.add_argument("-o", "--output", default=None,
                   help="the HTML file to write (default: the log's name with .html)")
    p.add_argument("--title", default=None, help="the report's title")
    p.add_argument("--run", type=int, default=None, metavar="K",
                   help="which run of a log several Guards appended to (1 = the first; "
                        "default: the last)")


def run(args: Any) -> int:
    import sys
    if not os.path.isfile(args.log):
        print(f"trainguard report: no such log file: {args.log}", file=sys.stderr)
        return 2
    out = args.output or os.path.splitext(args.log)[0] + ".html"
    try:
        save_report(args.log, out, args.title, run=args.run)
    except ValueError as e:
        print(f"trainguard report: {e}", file=sys.stderr)
        return 2
    print(f"trainguard report: wrote {out}")
    return 0
