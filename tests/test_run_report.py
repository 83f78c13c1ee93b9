"""The HTML run report (issue #14): from a real guarded run, a halted run, a million-step log;
escaped, self-contained, and rendered in a real headless Chromium."""
import json
import math
import os
import re
import subprocess

import pytest
import torch
from torch import nn

import trainguard as tg
from trainguard.report.html import RunData, render, save_report

EVIL = "<img src=x onerror=alert(1)>"


def _run(tmp_path, steps=120, halt=False, **kw):
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("inp", nn.Linear(8, 32))
    model.add_module("act", nn.ReLU())
    model.add_module(EVIL, nn.Linear(32, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    policy = tg.Policy(halt_on=["nonfinite"]) if halt else None
    guard = tg.Guard(model, opt, console=False, policy=policy, snapshot_every=20, **kw)
    X, y = torch.randn(128, 8), torch.randn(128, 1)
    err = None
    for step in range(steps):
        opt.zero_grad()
        x = X.clone()
        if step in (30, 31, 70):
            x[0, 0] = math.nan
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        try:
            guard.step(loss)
        except tg.TrainingUnstable as e:
            err = e
            break
    if err is None:
        guard.close()
    return guard, err


def test_report_of_a_guarded_run(tmp_path):
    pytest.importorskip("matplotlib")
    guard, _ = _run(tmp_path, report=tmp_path / "run.html", log_every=1)
    text = (tmp_path / "run.html").read_text(encoding="utf-8")
    assert sorted(os.listdir(tmp_path)) == ["run.html", "run.jsonl"]  # the log beside it
    assert guard.summary().splitlines()[-1] == f"  report: {tmp_path / 'run.html'}"
    assert EVIL not in text and html_escaped(EVIL) in text
    assert "http://" not in text and "https://" not in text and "<script" not in text.lower()
    assert text.count("src='data:image/png;base64,") == 4  # loss, grad norm, LR, heat map
    # every finding and every non-clip action has a row; each marker links to one
    n_rows = len(re.findall(r"<tr id='ev\d+'", text))
    marked = len(guard.findings) + sum(a.kind != "clip" for a in guard.actions)
    assert n_rows == marked and marked >= 6
    titles = re.findall(r"<area shape='circle' coords='\d+,\d+,8' href='#ev\d+' title='([^']*)'", text)
    assert titles and any("finding nonfinite" in t for t in titles)
    run = RunData.from_jsonl(tmp_path / "run.jsonl")
    assert run.loss.series()[3] == [30.0, 31.0, 70.0]  # non-finite steps kept, not dropped


def html_escaped(s):
    import html
    return html.escape(s, quote=True)


def test_report_of_a_halted_run_from_memory(tmp_path):
    pytest.importorskip("matplotlib")
    guard, err = _run(tmp_path, halt=True)
    assert err is not None
    path = guard.save_html(tmp_path / "halt.html")
    text = open(path, encoding="utf-8").read()
    assert "Why the run stopped" in text and "halted" in text
    assert "memory" in text  # no log: drawn from the Guard's memory
    # the same halted run from its JSONL log: the story is in the log
    _guard, err = _run(tmp_path, halt=True, log=str(tmp_path / "halt.jsonl"))
    assert err is not None
    text = open(save_report(tmp_path / "halt.jsonl", tmp_path / "h2.html"), encoding="utf-8").read()
    assert "Why the run stopped" in text and "trainguard halted training at step 30" in text


def test_report_of_a_million_steps(tmp_path):
    """A 1,000,000-step log (statistics every 10 steps, 400 findings and actions): every event
    kept in the table, the curves binned, one NaN among them still marked."""
    path = tmp_path / "long.jsonl"
    mods = ["embed", "block.0", "block.1", "head"]
    with open(path, "w") as fh:
        for step in range(0, 1_000_000, 10):
            loss = "NaN" if step == 777_770 else 2.0 / (1 + step / 1e5)
            fh.write(json.dumps({"type": "stats", "step": step, "loss": loss, "grad_norm": 1.0,
                                 "lr": 1e-3, "modules": mods,
                                 "grad_norms": [0.1, 0.2, "Infinity" if step == 777_770 else 0.3, 0.4]})
                     + "\n")
            if step % 5000 == 0:
                fh.write(json.dumps({"type": "finding", "kind": "loss_spike", "step": step,
                                     "severity": "warning", "message": f"spike {step}", "where": ""}) + "\n")
                fh.write(json.dumps({"type": "action", "kind": "skip", "step": step,
                                     "reason": f"skip {step}", "detail": {}}) + "\n")
    run = RunData.from_jsonl(path)
    assert run.stats_records == 100_000 and len(run.findings) == 200 and len(run.actions) == 200
    xs, _lo, _hi, bad = run.loss.series()
    assert len(xs) <= 2 * 1200 and bad == [777_770.0]
    text = render(run)
    assert text.count("<tr id='ev") == 400 or "matplotlib" in text


def test_cli_report(tmp_path, capsys):
    from trainguard.cli import main
    _run(tmp_path, log=str(tmp_path / "e.jsonl"), steps=40)
    assert main(["report", str(tmp_path / "e.jsonl"), "-o", str(tmp_path / "r.html")]) == 0
    assert (tmp_path / "r.html").exists()
    assert main(["report", str(tmp_path / "missing.jsonl")]) == 2
    (tmp_path / "bad.jsonl").write_text("not json\n")
    assert main(["report", str(tmp_path / "bad.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "no such log file" in err and "not a trainguard JSONL event" in err
    with pytest.raises(TypeError, match="JSONL log path"):
        save_report(42, tmp_path / "x.html")


def test_report_renders_in_headless_chromium(tmp_path, chromium):
    browser = chromium
    plt = pytest.importorskip("matplotlib.pyplot")
    _run(tmp_path, report=tmp_path / "run.html", log_every=1)
    shot = tmp_path / "shot.png"
    proc = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           f"--screenshot={shot}", "--window-size=1200,2400",
                           (tmp_path / "run.html").as_uri()], capture_output=True, timeout=120)
    assert shot.exists(), proc.stderr.decode(errors="replace")[-2000:]
    img = plt.imread(str(shot))
    rgb = img[..., :3]

    def count(r, g, b, tol=0.12):
        return int(((abs(rgb[..., 0] - r / 255) < tol) & (abs(rgb[..., 1] - g / 255) < tol)
                    & (abs(rgb[..., 2] - b / 255) < tol)).sum())
    assert count(31, 119, 180) > 300      # the loss curve (matplotlib blue)
    assert count(255, 127, 14) > 300      # the gradient norm (orange)
    assert count(214, 39, 40, 0.08) > 20  # the red non-finite ticks
    assert count(255, 0, 255, 0.08) > 20  # magenta non-finite cells in the heat map


def _short_run(log, steps, nan_at=(), state=None):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    guard = tg.Guard(model, opt, console=False, log=str(log), log_every=1)
    if state is not None:
        guard.load_state_dict(state)
    X, y = torch.randn(32, 8), torch.randn(32, 1)
    for t in range(steps):
        opt.zero_grad()
        x = X.clone()
        if guard.step_count in nan_at:
            x[0, 0] = math.nan
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        guard.step(loss)
    state = guard.state_dict()
    guard.close()
    return state


def test_a_log_several_runs_appended_to_is_reported_run_by_run(tmp_path, capsys):
    """Bug: a training script run twice with the same log path (nanoGPT's out_dir) appended the
    second run to the first, and the report drew both on one axis (step 0 twice, the first
    run's findings among the second's). Each sink opening the log writes ``run_start``; the
    report shows the last run, ``--run K`` another; a Guard resumed from its saved state
    (``run_resumed``) continues its run."""
    log = tmp_path / "events.jsonl"
    _short_run(log, 20, nan_at=(5,))            # run 1: one NaN step, skipped
    state = _short_run(log, 15)                 # run 2: healthy
    _short_run(log, 10, state=state)            # run 2 resumed at step 15
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    assert [d["type"] for d in lines].count("run_start") == 3
    assert [d["step"] for d in lines if d["type"] == "run_resumed"] == [15]
    last = RunData.from_jsonl(log)
    assert (last.runs_in_log, last.run_index) == (2, 2)
    assert (last.first_step, last.last_step) == (0, 24) and last.stats_records == 25
    assert not last.findings and not last.actions
    first = RunData.from_jsonl(log, run=1)
    assert first.run_index == 1 and first.last_step == 19
    assert [f["kind"] for f in first.findings] == ["nonfinite"]
    with pytest.raises(ValueError, match="holds 2 run"):
        RunData.from_jsonl(log, run=3)
    from trainguard.cli import main
    assert main(["report", str(log), "--run", "1", "-o", str(tmp_path / "r1.html")]) == 0
    text = (tmp_path / "r1.html").read_text(encoding="utf-8")
    assert "run 1 of the 2 in this log" in text
    # a log written before the markers existed is one run, as before
    old = tmp_path / "old.jsonl"
    old.write_text("".join(x + "\n" for x in log.read_text().splitlines()
                           if '"run_start"' not in x and '"run_resumed"' not in x))
    one = RunData.from_jsonl(old)
    assert one.runs_in_log == 1 and one.stats_records == 20 + 15 + 10
