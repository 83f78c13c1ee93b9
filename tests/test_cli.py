"""The command line as a user runs it."""
import pytest

from trainguard.cli import main


def test_demo_bare_dies_guarded_survives(capsys):
    assert main(["demo", "--steps", "120"]) == 0
    out = capsys.readouterr()
    text = out.out + out.err
    assert "loss became NaN at step" in text
    assert "rollback" in text and "lr_backoff" in text
    assert "guarded: survived" in text


def test_help_and_unknown_command(capsys):
    assert main([]) == 2
    with pytest.raises(SystemExit):
        main(["frobnicate"])


def test_demo_rejects_bad_arguments():
    with pytest.raises(SystemExit):
        main(["demo", "--steps", "0"])
