"""metrics.jsonl that survives kills and resumes, and progress that stays quiet off a terminal."""
import io
import json
import sys

import pytest

from training import logbook


def test_metrics_log_appends_and_truncates_past_the_resumed_step(tmp_path):
    log = logbook.MetricsLog(tmp_path, tensorboard=False)
    for step in range(1, 6):
        log.write(step, {"loss": 1.0 / step})
    log.close()
    with open(tmp_path / "metrics.jsonl", "a") as stream:
        stream.write('{"step": 6, "lo')  # torn by a kill
    assert [r["step"] for r in logbook.read_metrics(tmp_path / "metrics.jsonl")] == list(
        range(1, 6))
    resumed = logbook.MetricsLog(tmp_path, resume_from_step=3, tensorboard=False)
    resumed.write(4, {"loss": 0.0})
    resumed.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4]
    assert json.loads(lines[-1])["loss"] == 0.0


def test_tensorboard_events_are_written(tmp_path):
    log = logbook.MetricsLog(tmp_path)
    log.write(1, {"loss": 0.5, "nan_is_skipped": float("nan")})
    log.close()
    events = list((tmp_path / "tensorboard").iterdir())
    assert any(p.name.startswith("events.out.tfevents") for p in events)


def test_progress_prints_a_line_every_n_steps_off_a_terminal(capsys, monkeypatch):
    monkeypatch.setenv("CI", "1")
    progress = logbook.Progress(total=100, every=40, description="demo")
    for step in (20, 40, 60, 80, 100):
        progress.update(step, loss=1.0 / step)
    progress.close()
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[2] for line in lines] == ["40/100", "80/100", "100/100"]
    assert lines[0].startswith("demo step 40/100 loss 0.025")


def test_progress_every_zero_is_silent(capsys, monkeypatch):
    monkeypatch.setenv("CI", "1")
    progress = logbook.Progress(total=10, every=0)
    progress.update(10, loss=1.0)
    progress.close()
    assert capsys.readouterr().out == ""


def test_without_tensorboardx_it_warns_and_keeps_the_metrics(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboardX", None)  # import raises ImportError
    with pytest.warns(UserWarning, match="tensorboardX is not installed"):
        log = logbook.MetricsLog(tmp_path)
    log.write(1, {"loss": 0.5})
    log.close()
    assert logbook.read_metrics(tmp_path / "metrics.jsonl") == [{"step": 1, "loss": 0.5}]
    assert not (tmp_path / "tensorboard").exists()


class Stream(io.StringIO):
    """A text stream that says whether it is a terminal."""

    def __init__(self, terminal: bool):
        super().__init__()
        self.terminal = terminal

    def isatty(self) -> bool:
        return self.terminal


@pytest.mark.parametrize("stdout_terminal, stderr_terminal", [(True, False), (False, True)])
def test_the_bar_is_drawn_only_when_stderr_its_stream_is_a_terminal(
        monkeypatch, stdout_terminal, stderr_terminal):
    """tqdm writes to stderr: a terminal on stdout with stderr redirected to a file gets the
    progress lines, and the file gets no bar."""
    monkeypatch.delenv("CI", raising=False)
    stdout, stderr = Stream(stdout_terminal), Stream(stderr_terminal)
    monkeypatch.setattr(sys, "stdout", stdout)
    monkeypatch.setattr(sys, "stderr", stderr)
    assert logbook.interactive() == stderr_terminal
    progress = logbook.Progress(total=10, every=5, description="demo")
    for step in (5, 10):
        progress.update(step, loss=0.5)
    progress.close()
    if stderr_terminal:
        assert "demo" in stderr.getvalue() and stdout.getvalue() == ""
    else:
        assert stderr.getvalue() == ""
        assert [line.split()[2] for line in stdout.getvalue().splitlines()] == ["5/10", "10/10"]
