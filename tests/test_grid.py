"""experiments.grid: settings x seeds, one sweep per setting, one row per setting."""
import json
import statistics

import pytest

from experiments import grid
from training.config import ConfigError

COMMON = ["--restarts", "2", "--no-gradient-report", "--progress-every", "0"]


def test_a_grid_is_one_sweep_per_setting_and_one_row_each(tmp_path):
    """Two settings of a short lecture run at seeds 0 and 3: each row's mean and extremes are
    those of the setting's own runs, as their results.json files give them."""
    sweeps = grid.main(["--experiment", "lecture", "--seeds", "0,3", "--workdir",
                        str(tmp_path), "--metrics", "test_accuracy", "--settings",
                        "--steps 20; --steps 40", "--", *COMMON])
    assert [s["options"] for s in sweeps] == [" ".join([*COMMON, "--steps", steps])
                                              for steps in ("20", "40")]
    for k, sweep in enumerate(sweeps):
        runs = [json.loads((tmp_path / f"setting_{k}" / f"seed_{seed}" / "results.json")
                           .read_text()) for seed in (0, 3)]
        assert [run["config"]["steps"] for run in runs] == [(20, 40)[k]] * 2
        values = [run["metrics"]["test_accuracy"] for run in runs]
        stats = sweep["metrics"]["test_accuracy"]
        assert stats["mean"] == pytest.approx(statistics.mean(values), rel=1e-12)
        assert (stats["min"], stats["max"]) == (min(values), max(values))
    table = (tmp_path / "results.md").read_text()
    rows, against_first = table.split("Against the first sweep")
    assert rows.count("| setting_") == 2 and "--steps 40" in rows
    assert against_first.count("| setting_1 | test_accuracy |") == 1
    document = json.loads((tmp_path / "results.json").read_text())
    assert {"experiment", "config", "environment", "metrics", "history", "seconds"} <= set(
        document)
    assert document["experiment"] == "grid"
    assert document["config"]["experiment_options"] == COMMON
    assert document["metrics"]["setting_1"] == sweeps[1]["metrics"]
    assert document["history"] == sweeps
    [difference] = document["differences"]
    assert difference["difference"] == pytest.approx(
        sweeps[1]["metrics"]["test_accuracy"]["mean"]
        - sweeps[0]["metrics"]["test_accuracy"]["mean"], rel=1e-12, abs=1e-15)
    assert difference["shared_seeds"] == 2
    assert (tmp_path / "compare" / "compare.png").stat().st_size > 10_000


@pytest.mark.parametrize("settings, message", [
    ("", "--settings: got nothing"),
    ("--steps 20; --steps 20", "--settings: got '--steps 20; --steps 20'; allowed: distinct"),
    ("--steps 20; --seed 4", "experiment option --seed: it is set for each run"),
])
def test_bad_settings_are_refused_before_any_run(tmp_path, settings, message):
    with pytest.raises(ConfigError, match=message):
        grid.main(["--experiment", "lecture", "--workdir", str(tmp_path / "g"), "--settings",
                   settings, "--", *COMMON])
    assert not (tmp_path / "g").exists()


@pytest.mark.parametrize("settings, message", [
    ("--steps '20", "--settings: got \"--steps '20\"; No closing quotation"),  # a traceback
    # the same runs twice, under two settings
    ("--steps 20; --steps=20", "--settings: settings 1 and 2 .* give the same config"),
    ("--steps 20 --restarts 2; --steps 20", "--settings: settings 1 and 2 .* the same config"),
])
def test_unreadable_or_equivalent_settings_are_refused_before_any_run(tmp_path, settings,
                                                                      message):
    with pytest.raises(ConfigError, match=message):
        grid.main(["--experiment", "lecture", "--seeds", "0", "--workdir", str(tmp_path / "g"),
                   "--settings", settings, "--", *COMMON])
    assert not (tmp_path / "g").exists()


def test_repeated_seeds_are_refused_before_the_grid_claims_its_workdir(tmp_path):
    """--seeds 1,1 is refused before config.json is written: the corrected command may use
    the same --workdir."""
    with pytest.raises(ConfigError, match="--seeds: got 1,1; allowed: distinct seeds"):
        grid.main(["--experiment", "lecture", "--workdir", str(tmp_path / "g"), "--seeds",
                   "1,1", "--settings", "--steps 20; --steps 40", "--", *COMMON])
    assert not (tmp_path / "g").exists()


def test_an_option_the_experiment_lacks_stops_the_grid_before_any_run(tmp_path, capsys):
    with pytest.raises(SystemExit):
        grid.main(["--experiment", "lecture", "--workdir", str(tmp_path / "g"), "--settings",
                   "--steps 20; --no-such-option 1", "--", *COMMON])
    assert "--no-such-option" in capsys.readouterr().err
    assert not (tmp_path / "g").exists()


def test_an_option_that_would_do_nothing_stops_the_grid_before_any_run(tmp_path):
    """The second setting gives --optimizer to the modern variant, which has none: refused
    before the first setting runs, as a bad value is."""
    with pytest.raises(ConfigError, match="option --optimizer: got 'sdlm'; it applies only "
                                          "with --variant 1989"):
        grid.main(["--experiment", "lenet1989", "--seeds", "0", "--workdir", str(tmp_path / "g"),
                   "--settings", "--order shuffled; --variant modern --optimizer sdlm", "--",
                   "--passes", "1", "--train-examples", "20", "--test-examples", "20"])
    assert not (tmp_path / "g").exists()


def test_an_empty_setting_is_the_defaults():
    assert grid.split_settings("--lr 0.01;") == [["--lr", "0.01"], []]
    assert grid.split_settings('--note "a b"; --lr 2') == [["--note", "a b"], ["--lr", "2"]]


def test_a_first_run_refused_by_its_data_checks_leaves_the_grids_workdir_free(tmp_path):
    """A batch larger than the lecture's training set is a data check inside the first run,
    after the grid has written its config.json: it is removed again, and the corrected grid
    runs in the same workdir without --force."""
    def run(batch_size):
        return grid.main(["--experiment", "lecture", "--workdir", str(tmp_path / "g"),
                          "--seeds", "0", "--settings", "--steps 20; --steps 40", "--",
                          *COMMON, "--procedure", "misclassified", "--batch-size",
                          str(batch_size)])

    with pytest.raises(ConfigError, match="option --batch-size: got 5000; allowed: at most"):
        run(5000)
    assert not (tmp_path / "g" / "config.json").exists()
    assert len(run(8)) == 2
