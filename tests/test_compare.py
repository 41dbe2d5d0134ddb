"""experiments.compare on two small lecture runs."""
import json

import pytest

from experiments import compare, lecture

SMALL = ["--restarts", "2", "--no-gradient-report", "--progress-every", "0", "--steps", "20",
         "--checkpoint-every", "20"]


def test_compare_overlays_curves_and_tabulates_metrics(tmp_path, capsys):
    lecture.main(["--workdir", str(tmp_path / "slow"), "--lr", "0.05", *SMALL])
    lecture.main(["--workdir", str(tmp_path / "fast"), "--lr", "0.3", *SMALL])
    capsys.readouterr()
    assert compare.main([str(tmp_path / "slow"), str(tmp_path / "fast"),
                         "--workdir", str(tmp_path / "cmp")]) == 0
    summary = json.loads((tmp_path / "cmp" / "results.json").read_text())
    assert summary["labels"] == ["slow", "fast"]
    slow, fast = summary["metrics"]["final_energy"]
    assert fast < slow  # the larger step went further in 20 steps
    for name in ("energy", "held_out_error", "train_error"):
        assert name in summary["curves"]
    assert (tmp_path / "cmp" / "compare.png").stat().st_size > 10_000
    printed = capsys.readouterr().out
    assert "| metric | slow | fast |" in printed and "test_accuracy" in printed


def test_compare_names_a_directory_without_results(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"{tmp_path} has no results.json"):
        compare.main([str(tmp_path)])
