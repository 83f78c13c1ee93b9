"""Progress lines with an ETA (issue #14, item 4)."""
import io

from trainguard.progress import Progress


def test_progress_lines_and_eta():
    out = io.StringIO()
    with Progress(3, "zoo", enabled=True, stream=out) as p:
        for name in ("a", "b", "c"):
            p.start(name)
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("[1/3] zoo: a (elapsed 0:00)")
    assert lines[1].startswith("[2/3] zoo: b (elapsed") and "ETA" in lines[1]
    assert lines[-1].startswith("zoo: 3/3 done in")


def test_progress_is_silent_when_disabled_or_not_a_terminal():
    out = io.StringIO()
    with Progress(2, "x", stream=out) as p:  # enabled=None: StringIO is no terminal
        p.start("a")
    assert out.getvalue() == ""
