"""Self-contained HTML rendering of a DoctorReport: inline PNG plots (base64 data URIs), no
external assets. matplotlib is optional (imported lazily with the Agg backend); without it
the report has the tables and a note instead of plots. Every string that comes from the
model (module names, messages) is HTML-escaped."""
from __future__ import annotations

import base64
import html
import io
import math
from typing import Any

from ._common import fmt

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#1a1a1a;max-width:1150px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:26px 0 8px;border-bottom:1px solid #ddd;padding-bottom:4px}
.ok{color:#1b7f3b;font-weight:600}.bad{color:#b3261e;font-weight:600}
table{border-collapse:collapse;font-size:13px;width:100%}td,th{border:1px solid #ddd;padding:4px 6px;text-align:left;vertical-align:top}
th{background:#f4f4f4}.sev-error{background:#fde7e6}.sev-warning{background:#fff4d6}.sev-info{background:#eef4fb}
.v-healthy{color:#1b7f3b}.v-bad{color:#b3261e;font-weight:600}img{max-width:100%;border:1px solid #eee;margin:6px 0}
.kv td:first-child{width:260px;color:#555}
"""


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    import matplotlib.pyplot as plt
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _plots(rep: Any) -> dict[str, str]:
    try:
        import matplotlib
        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except Exception:  # matplotlib is an optional extra
        return {}
    out: dict[str, str] = {}
    if rep.layers:
        idx = list(range(len(rep.layers)))

        def series(attr: str, which: str) -> list[float]:
            v = []
            for lv in rep.layers:
                s = getattr(lv, which)
                x = getattr(s, attr) if s is not None else math.nan
                v.append(x if x is not None and math.isfinite(x) and x > 0 else math.nan)
            return v

        fig, axes = plt.subplots(2, 2, figsize=(12, 7))
        for ax, attr, title, log in ((axes[0][0], "q", "activation second moment mean(h²)", True),
                                     (axes[0][1], "grad_rms", "back-propagated gradient RMS ∂L/∂h", True),
                                     (axes[1][1], "gain", "Jacobian gain (Hutchinson)", True)):
            ax.plot(idx, series(attr, "init"), "o-", ms=3, label="init")
            if any(lv.after is not None for lv in rep.layers):
                ax.plot(idx, series(attr, "after"), "s--", ms=3, label="after trial steps")
            if log:
                ax.set_yscale("log")
            ax.set_title(title, fontsize=10)
            ax.set_xlabel("layer (forward order)")
            ax.legend(fontsize=8)
            ax.grid(alpha=0.3)
        ax = axes[1][0]
        dead = [lv.init.dead if lv.init and math.isfinite(lv.init.dead) else math.nan for lv in rep.layers]
        sat = [lv.init.saturated if lv.init and math.isfinite(lv.init.saturated) else math.nan for lv in rep.layers]
        dead_a = [lv.after.dead if lv.after and math.isfinite(lv.after.dead) else math.nan for lv in rep.layers]
        ax.plot(idx, dead, "o-", ms=3, label="dead (init)")
        ax.plot(idx, dead_a, "s--", ms=3, label="dead (after)")
        ax.plot(idx, sat, "^-", ms=3, label="saturated (init)")
        ax.set_ylim(-0.05, 1.05)
        ax.set_title("dead / saturated fraction", fontsize=10)
        ax.set_xlabel("layer (forward order)")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        bad = [i for i, lv in enumerate(rep.layers) if lv.verdict != "healthy"]
        for a in (axes[0][0], axes[0][1]):
            for i in bad:
                a.axvspan(i - 0.4, i + 0.4, color="#b3261e", alpha=0.08)
        fig.suptitle("per-layer signal propagation (red bands: unhealthy layers)", fontsize=11)
        fig.tight_layout()
        out["layers"] = _png(fig)
    rt = rep.range_test
    if rt is not None and rt.lrs:
        fig, ax = plt.subplots(figsize=(12, 4))
        n = len(rt.smoothed)
        fin = [(l, s) for l, s in zip(rt.lrs[:n], rt.smoothed) if math.isfinite(s)]
        raw = [(l, s) for l, s in zip(rt.lrs, rt.losses) if math.isfinite(s)]
        if raw:
            ax.plot(*zip(*raw), color="#bbb", lw=1, label="loss")
        if fin:
            ax.plot(*zip(*fin), color="#1f5fbf", lw=2, label="smoothed loss")
            lo = min(s for _, s in fin)
            hi = max(s for _, s in fin)
            ax.set_ylim(lo - 0.05 * (hi - lo + 1e-12), min(hi, 4.5 * lo if lo > 0 else hi) + 0.05 * (hi - lo + 1e-12))
        ax.set_xscale("log")
        for x, c, lab in ((rep.lr, "k", "current lr"), (rep.max_stable_lr, "#b3261e", "curvature limit"),
                          (rep.suggested_lr, "#1b7f3b", "suggested lr"), (rt.lr_diverge, "#e08a00", "range-test divergence")):
            if x is not None and math.isfinite(x) and x > 0:
                ax.axvline(x, color=c, ls="--", lw=1.2, label=f"{lab} {x:.3g}")
        ax.set_xlabel("learning rate")
        ax.set_ylabel("loss")
        ax.set_title("LR range test (exponential sweep) with the curvature limit", fontsize=10)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        out["lr"] = _png(fig)
    cv = rep.curvature
    if cv is not None and cv.history:
        fig, ax = plt.subplots(figsize=(12, 3.2))
        ax.plot(range(1, len(cv.history) + 1), cv.history, "o-", ms=3)
        ax.axhline(cv.threshold / rep.lr if rep.lr > 0 else math.nan, color="#b3261e", ls="--",
                   label=f"stability threshold {cv.threshold:.3g}/lr")
        ax.set_xlabel("power iteration")
        ax.set_ylabel("Rayleigh quotient")
        ax.set_title(f"top {'preconditioned ' if cv.preconditioned else ''}Hessian eigenvalue "
                     f"(λ_max={cv.lambda_max:.4g})", fontsize=10)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        out["curv"] = _png(fig)
    pa = rep.precision
    if pa is not None and pa.layers:
        fig, axes = plt.subplots(1, 2, figsize=(12, 3.8))
        idx = list(range(len(pa.layers)))
        for f, c in (("fp16", "#b3261e"), ("bf16", "#1f5fbf")):
            axes[0].plot(idx, [min(lp.headroom_bits.get(f, math.nan), 140) for lp in pa.layers], "o-", ms=3,
                         color=c, label=f"{f} headroom (bits)")
            axes[1].plot(idx, [lp.sensitivity.get(f, math.nan) if math.isfinite(lp.sensitivity.get(f, math.nan))
                               and lp.sensitivity.get(f, 0) > 0 else math.nan for lp in pa.layers],
                         "o-", ms=3, color=c, label=f"{f}: output error, this layer cast")
            axes[1].plot(idx, [lp.limit.get(f, math.nan) for lp in pa.layers], ":", color=c,
                         label=f"{f} limit 10·√K·u")
        axes[0].axhline(0, color="k", lw=1)
        axes[0].set_title("amax headroom log2(format max / amax)", fontsize=10)
        axes[1].set_yscale("log")
        axes[1].set_title("one-layer-at-a-time precision sensitivity vs fp64", fontsize=10)
        for a in axes:
            a.set_xlabel("layer (forward order)")
            a.legend(fontsize=8)
            a.grid(alpha=0.3)
        fig.tight_layout()
        out["prec"] = _png(fig)
    return out


def render(rep: Any) -> str:
    plots = _plots(rep)
    h: list[str] = ["<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
                    f"<title>trainguard doctor: {_e(rep.model_name)}</title><style>{_CSS}</style></head><body>"]
    h.append(f"<h1>trainguard doctor — {_e(rep.model_name)}</h1>")
    verdict = ("<span class='ok'>healthy</span>" if rep.healthy else
               f"<span class='bad'>{sum(f.severity != 'info' for f in rep.findings)} problem(s)</span>")
    h.append(f"<p>Verdict: {verdict} · optimizer {_e(rep.optimizer)} · lr {_e(fmt(rep.lr))} · "
             f"diagnosed in {rep.seconds:.2f}s</p>")
    h.append("<h2>Learning rate</h2><table class='kv'>")
    limit = fmt(rep.max_stable_lr) + (f" ({rep.limit_note})" if rep.limit_note else "")
    rows = [("max stable lr (curvature)", limit), ("suggested lr", fmt(rep.suggested_lr)),
            ("warmup steps", rep.warmup_steps)]
    if rep.curvature is not None:
        cv = rep.curvature
        rows += [("λ_max" + (" (preconditioned P⁻¹ᐟ²HP⁻¹ᐟ²)" if cv.preconditioned else ""), fmt(cv.lambda_max, 4)),
                 ("raw Hessian λ_max", fmt(cv.lambda_raw, 4)),
                 ("stability rule", f"λ_max < {cv.threshold:.3g}/lr ({cv.optimizer})"),
                 ("power iterations", f"{cv.iterations} ({'converged' if cv.converged else 'not converged'})")]
        if cv.note:
            rows.append(("note", cv.note))
    if rep.range_test is not None:
        rt = rep.range_test
        rows += [("range test: divergence lr", fmt(rt.lr_diverge)), ("range test: lr at min loss", fmt(rt.lr_min_loss)),
                 ("range test: steepest descent lr", fmt(rt.lr_steepest))]
    if rep.noise is not None:
        ns = rep.noise
        rows += [("gradient noise scale B_simple (≈ critical batch)", fmt(ns.b_simple)), ("batch size", ns.batch),
                 ("ε_max = |G|²/GᵀHG", fmt(ns.eps_max)), ("ε_opt at this batch", fmt(ns.eps_opt))]
    h += [f"<tr><td>{_e(k)}</td><td>{_e(v)}</td></tr>" for k, v in rows]
    h.append("</table>")
    h.append("<h2>Findings</h2>")
    if rep.findings:
        h.append("<table><tr><th>severity</th><th>kind</th><th>where</th><th>message</th></tr>")
        for f in rep.findings:
            where = ", ".join(f.locations[:6]) + ("…" if len(f.locations) > 6 else "")
            h.append(f"<tr class='sev-{_e(f.severity)}'><td>{_e(f.severity)}</td><td>{_e(f.kind)}</td>"
                     f"<td>{_e(where)}</td><td>{_e(f.message)}</td></tr>")
        h.append("</table>")
    else:
        h.append("<p>No findings.</p>")
    h.append("<h2>Prescriptions (ranked)</h2>")
    if rep.prescriptions:
        h.append("<table><tr><th>#</th><th>change</th><th>where</th><th>why</th><th>expected effect</th></tr>")
        for p in rep.prescriptions:
            where = ", ".join(p.where[:6]) + ("…" if len(p.where) > 6 else "")
            h.append(f"<tr><td>{p.rank}</td><td>{_e(p.action)}</td><td>{_e(where)}</td>"
                     f"<td>{_e(p.why)}</td><td>{_e(p.expected)}</td></tr>")
        h.append("</table>")
    else:
        h.append("<p>Nothing to change.</p>")
    h.append("<h2>Signal propagation</h2>")
    if "layers" in plots:
        h.append(f"<img alt='per-layer statistics' src='{plots['layers']}'>")
    if rep.layers:
        h.append("<table><tr><th>layer</th><th>kind</th><th>verdict</th><th>q (init)</th><th>grad RMS ratio</th>"
                 "<th>dead</th><th>saturated</th><th>gain</th></tr>")
        for lv in rep.layers:
            s = lv.init
            cls = "v-healthy" if lv.verdict == "healthy" else "v-bad"
            h.append(f"<tr><td>{_e(lv.name)}</td><td>{_e(lv.kind)}</td><td class='{cls}'>{_e(lv.verdict)}</td>"
                     f"<td>{_e(fmt(s.q if s else None))}</td><td>{_e(fmt(lv.grad_ratio))}</td>"
                     f"<td>{_e(fmt(s.dead if s else None))}</td><td>{_e(fmt(s.saturated if s else None))}</td>"
                     f"<td>{_e(fmt(s.gain if s else None))}</td></tr>")
        h.append("</table>")
    h.append("<h2>Learning-rate range test and curvature</h2>")
    for k, alt in (("lr", "LR range test"), ("curv", "curvature power iteration")):
        if k in plots:
            h.append(f"<img alt='{alt}' src='{plots[k]}'>")
    pa = rep.precision
    h.append("<h2>Precision</h2>")
    if pa is not None:
        h.append("<table class='kv'>")
        for f, v in pa.can_train.items():
            h.append(f"<tr><td>train in {_e(f)}?</td><td>{_e(v)}</td></tr>")
        for f, v in pa.keep_fp32.items():
            h.append(f"<tr><td>keep in fp32 under {_e(f)}</td><td>{_e(', '.join(v) or 'none')}</td></tr>")
        for k, v in pa.grad_underflow.items():
            h.append(f"<tr><td>gradient fraction: {_e(k)}</td><td>{_e(fmt(v))}</td></tr>")
        for k, v in pa.swamping.items():
            h.append(f"<tr><td>update swamping rate ({_e(k)} weights)</td><td>{_e(fmt(v))}</td></tr>")
        for k, v in pa.output_error.items():
            h.append(f"<tr><td>model output rel. error vs fp64 ({_e(k)})</td><td>{_e(fmt(v))}</td></tr>")
        h.append("</table>")
        if "prec" in plots:
            h.append(f"<img alt='precision headroom' src='{plots['prec']}'>")
    else:
        h.append("<p>Not audited.</p>")
    if not plots:
        h.append("<p><em>Plots need matplotlib (pip install trainguard[report]).</em></p>")
    h.append("</body></html>")
    return "\n".join(h)
