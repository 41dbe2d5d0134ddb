"""experiments.compare on small lecture runs and sweeps of them."""
import json
import statistics

import pytest

from experiments import compare, lecture, seeds
from training.config import ConfigError

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


def write_run(directory, counter, values):
    directory.mkdir(parents=True)
    history = [{counter: i + 1, "test_error": v} for i, v in enumerate(values)]
    (directory / "results.json").write_text(json.dumps(
        {"experiment": "lenet1989", "metrics": {"test_error": values[-1]}, "history": history}))


def test_compare_plots_against_passes_epochs_or_the_record_index(tmp_path):
    """LeNet histories count passes, the language models' epochs: each is the x axis (never a
    curve of its own); runs that share none are plotted against the record index."""
    write_run(tmp_path / "a", "pass", [0.09, 0.07, 0.06])
    write_run(tmp_path / "b", "pass", [0.10, 0.08, 0.05])
    assert compare.main([str(tmp_path / "a"), str(tmp_path / "b"),
                         "--workdir", str(tmp_path / "cmp")]) == 0
    summary = json.loads((tmp_path / "cmp" / "results.json").read_text())
    assert summary["curves"] == ["test_error"]
    assert summary["metrics"]["test_error"] == [0.06, 0.05]
    assert (tmp_path / "cmp" / "compare.png").stat().st_size > 10_000
    assert compare.counter([[{"epoch": 1, "pass": 1}], [{"epoch": 1}]]) == "epoch"
    assert compare.counter([[{"pass": 1}], [{"epoch": 1}]]) is None
    assert list(compare.x_values([{"e": 0.1}, {"e": 0.2}], None)) == [1, 2]


def test_compare_of_seed_sweeps_has_one_row_per_sweep(tmp_path, capsys):
    """Two sweeps of experiments.seeds (lecture at two step sizes, seeds 0 and 1): one row
    each with its options and, per metric, the mean, sd, min and max that Python's
    statistics give over the runs the sweep made; a metric not in every sweep is refused."""
    sweeps = {lr: seeds.main(["--experiment", "lecture", "--seeds", "0,1", "--workdir",
                              str(tmp_path / f"lr_{lr}"), "--metrics",
                              "test_accuracy,final_energy", "--", *SMALL, "--lr", lr])
              for lr in ("0.05", "0.3")}
    capsys.readouterr()
    assert compare.main([str(tmp_path / "lr_0.05"), str(tmp_path / "lr_0.3"), "--metrics",
                         "final_energy", "--workdir", str(tmp_path / "cmp")]) == 0
    summary = json.loads((tmp_path / "cmp" / "results.json").read_text())
    assert [s["options"] for s in summary["sweeps"]] == [
        " ".join([*SMALL, "--lr", lr]) for lr in ("0.05", "0.3")]
    for record, lr in zip(summary["sweeps"], ("0.05", "0.3")):
        values = [row["final_energy"] for row in sweeps[lr]["per_seed"]]
        assert list(record["metrics"]) == ["final_energy"]
        assert record["metrics"]["final_energy"] == pytest.approx({
            "n": 2, "mean": statistics.mean(values), "sd": statistics.stdev(values),
            "min": min(values), "max": max(values)}, rel=1e-12)
    printed = capsys.readouterr().out
    assert "| sweep | options | seeds | final_energy |" in printed
    stats = summary["sweeps"][1]["metrics"]["final_energy"]
    assert (f"| lr_0.3 | {summary['sweeps'][1]['options']} | 2 | {stats['mean']:.4g} ± "
            f"{stats['sd']:.3g} [{stats['min']:.4g}, {stats['max']:.4g}] |") in printed
    with pytest.raises(ConfigError, match="--metrics: got test_acc; allowed: the metrics "
                                          "every sweep summarised, test_accuracy, final_energy"):
        compare.main([str(tmp_path / "lr_0.05"), str(tmp_path / "lr_0.3"), "--metrics",
                      "test_acc", "--workdir", str(tmp_path / "bad")])
    assert "missed_by_every_run" not in summary  # the lecture lists no misclassified examples
    assert (tmp_path / "cmp" / "compare.png").stat().st_size > 10_000


def test_examples_every_seed_of_every_sweep_misses():
    """Two sweeps by hand: 4 and 9 are missed by all 3 seeds of the first, 4, 9 and 12 by both
    seeds of the second, 11 only by some seeds: 4 and 9 are missed by every run."""
    def sweep(seeds_run, counts):
        return {"experiment": "seeds", "config": {"seeds": seeds_run}, "misclassified": {
            "examples": [{"index": i, "label": 0, "seeds": k, "predicted": {"1": k}}
                         for i, k in counts.items()]}}

    first = sweep([0, 1, 2], {4: 3, 9: 3, 11: 2, 12: 1})
    second = sweep([0, 5], {12: 2, 9: 2, 4: 2, 11: 1})
    assert compare.always_missed([first, second]) == [4, 9]
    assert compare.always_missed([first, {"experiment": "seeds"}]) is None


def test_sweeps_against_the_first_with_standard_errors(tmp_path, capsys):
    """Two sweeps written by hand, seeds 0-2 and 1-3: the difference of the means with its
    unpaired standard error, and the paired one over seeds 1 and 2, each against numbers
    computed by hand."""
    def write_sweep(name, values):
        history = [{"seed": seed, "misses": float(v)} for seed, v in values.items()]
        stats = seeds.summary(list(values.values()))
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps({
            "experiment": "seeds", "config": {"seeds": list(values)},
            "metrics": {"misses": stats}, "history": history}))

    write_sweep("a", {0: 100, 1: 104, 2: 108})  # mean 104, sd 4
    write_sweep("b", {1: 101, 2: 107, 3: 110})  # mean 106, sd sqrt(21)
    assert compare.main([str(tmp_path / "a"), str(tmp_path / "b"),
                         "--workdir", str(tmp_path / "cmp")]) == 0
    [row] = json.loads((tmp_path / "cmp" / "results.json").read_text())["differences"]
    assert row["label"] == "b" and row["against"] == "a" and row["metric"] == "misses"
    assert row["difference"] == pytest.approx(2.0, rel=1e-12)
    assert row["se"] == pytest.approx((16 / 3 + 21 / 3) ** 0.5, rel=1e-12)
    # Seeds 1 and 2 differ by -3 and -1: mean -2, sd sqrt(2), standard error 1.
    assert row["shared_seeds"] == 2
    assert row["paired_difference"] == pytest.approx(-2.0, rel=1e-12)
    assert row["paired_se"] == pytest.approx(1.0, rel=1e-12)
    printed = capsys.readouterr().out
    assert "| b | misses | +2 ± 3.51 | -2 ± 1 | 2 |" in printed


def test_standard_errors_of_sweeps_of_different_sizes(tmp_path):
    """Sweeps of 3 and 5 seeds, values by hand: a = 100, 104, 108 (seeds 0-2; mean 104, sd 4),
    b = 101, 107, 110, 106, 106 (seeds 0-4; mean 106, sd^2 = 42/4 = 10.5). The unpaired
    standard error is sqrt(16/3 + 10.5/5) (each sweep's variance over its own n), the paired
    difference over seeds 0-2 is the mean of 1, 3, 2 = 2 with sd 1, standard error 1/sqrt(3).
    It fails if either variance is divided by the other sweep's n, if the sds take n rather
    than n - 1, or if the pairing is off by one seed."""
    def write_sweep(name, values):
        history = [{"seed": seed, "misses": float(v)} for seed, v in values.items()]
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps({
            "experiment": "seeds", "config": {"seeds": list(values)},
            "metrics": {"misses": seeds.summary(list(values.values()))},
            "history": history}))

    write_sweep("a", {0: 100, 1: 104, 2: 108})
    write_sweep("b", {0: 101, 1: 107, 2: 110, 3: 106, 4: 106})
    assert compare.main([str(tmp_path / "a"), str(tmp_path / "b"),
                         "--workdir", str(tmp_path / "cmp")]) == 0
    [row] = json.loads((tmp_path / "cmp" / "results.json").read_text())["differences"]
    assert row["difference"] == pytest.approx(2.0, rel=1e-12)
    assert row["se"] == pytest.approx((16 / 3 + 10.5 / 5) ** 0.5, rel=1e-12)
    assert row["shared_seeds"] == 3
    assert row["paired_difference"] == pytest.approx(2.0, rel=1e-12)
    assert row["paired_se"] == pytest.approx(3 ** -0.5, rel=1e-12)


def test_a_metric_no_run_has_is_refused_and_nothing_is_written(tmp_path):
    """A misspelt --metrics name used to be a row of "-" in the table."""
    write_run(tmp_path / "a", "pass", [0.09, 0.06])
    write_run(tmp_path / "b", "pass", [0.10, 0.05])
    with pytest.raises(ConfigError, match="option --metrics: got test_eror; allowed: the "
                                          "metrics of the runs, test_error"):
        compare.main([str(tmp_path / "a"), str(tmp_path / "b"), "--metrics",
                      "test_eror,test_error", "--workdir", str(tmp_path / "cmp")])
    assert not (tmp_path / "cmp").exists()


def test_a_workdir_holding_a_run_is_refused_not_overwritten(tmp_path):
    """--workdir set to one of the runs (or any run): its results.json stays as it was; a
    comparison's own workdir may be written again."""
    write_run(tmp_path / "a", "pass", [0.09, 0.06])
    write_run(tmp_path / "b", "pass", [0.10, 0.05])
    before = (tmp_path / "a" / "results.json").read_text()
    with pytest.raises(ConfigError, match=r"option --workdir: .*a/results.json holds the "
                                          "results of a run of lenet1989"):
        compare.main([str(tmp_path / "a"), str(tmp_path / "b"),
                      "--workdir", str(tmp_path / "a")])
    assert (tmp_path / "a" / "results.json").read_text() == before
    for _ in range(2):
        assert compare.main([str(tmp_path / "a"), str(tmp_path / "b"),
                             "--workdir", str(tmp_path / "cmp")]) == 0


def test_the_comparison_writes_every_experiments_keys(tmp_path):
    """results.json has the keys every experiment writes (README, "Experiments")."""
    write_run(tmp_path / "a", "pass", [0.09, 0.06])
    write_run(tmp_path / "b", "pass", [0.10, 0.05])
    compare.main([str(tmp_path / "a"), str(tmp_path / "b"), "--workdir", str(tmp_path / "cmp")])
    summary = json.loads((tmp_path / "cmp" / "results.json").read_text())
    for key in ("experiment", "config", "environment", "metrics", "history", "seconds"):
        assert key in summary, key
    assert summary["experiment"] == "compare"
    assert summary["config"]["runs"] == [str(tmp_path / "a"), str(tmp_path / "b")]
    assert summary["metrics"]["test_error"] == [0.06, 0.05]
