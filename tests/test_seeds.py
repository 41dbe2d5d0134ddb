"""experiments.seeds: a sweep over seeds against the same runs made one by one."""
import json
import statistics

import numpy as np
import pytest

from experiments import lecture, seeds
from training import results
from training.config import ConfigError

SMALL = ["--steps", "20", "--restarts", "2", "--no-gradient-report", "--progress-every", "0"]


@pytest.mark.parametrize("jobs", [1, 2])
def test_a_sweep_summarises_the_runs_it_would_make_one_by_one(tmp_path, jobs):
    """Seeds 0, 2 and 5 of a short lecture run, in this process or two worker processes at a
    time: each seed's metrics are those of `experiments.lecture --seed K` run alone, and the
    summary is the statistics module's."""
    sweep = seeds.main(["--experiment", "lecture", "--seeds", "0,2,5", "--workdir",
                        str(tmp_path / "sweep"), "--metrics", "test_accuracy,final_energy",
                        "--at-least", "test_accuracy=0.73", "--jobs", str(jobs), "--", *SMALL])
    alone = [lecture.main([*SMALL, "--seed", str(seed), "--workdir",
                           str(tmp_path / f"alone_{seed}")]) for seed in (0, 2, 5)]
    assert [row["seed"] for row in sweep["per_seed"]] == [0, 2, 5]
    for name in ("test_accuracy", "final_energy"):
        values = [float(metrics[name]) for metrics in alone]
        assert [row[name] for row in sweep["per_seed"]] == values
        assert sweep["summary"][name] == pytest.approx({
            "n": 3, "mean": statistics.mean(values), "sd": statistics.stdev(values),
            "standard_error": statistics.stdev(values) / 3 ** 0.5,
            "median": statistics.median(values), "min": min(values), "max": max(values)},
            rel=1e-12)
    meeting = [seed for seed, m in zip((0, 2, 5), alone) if m["test_accuracy"] >= 0.73]
    accuracies = [float(m["test_accuracy"]) for m in alone]
    distance = ((statistics.mean(accuracies) - 0.73)
                / (statistics.stdev(accuracies) / 3 ** 0.5))
    assert sweep["thresholds"]["at_least"] == {
        "metric": "test_accuracy", "value": 0.73, "seeds": meeting, "count": len(meeting),
        "mean_in_standard_errors": pytest.approx(distance, rel=1e-12)}
    document = json.loads((tmp_path / "sweep" / "results.json").read_text())
    assert document["metrics"] == sweep["summary"]
    assert document["config"]["experiment_options"] == SMALL
    for name in ("results.md", "spread.png", "seed_2/results.json", "seed_5/config.json"):
        assert (tmp_path / "sweep" / name).is_file(), name
    side = "above" if distance > 0 else "below"
    assert (f"{len(meeting)} of 3 seeds have test_accuracy >= 0.73: {meeting}; the mean, "
            f"{statistics.mean(accuracies):.4g}, lies {abs(distance):.2f} standard errors "
            f"{side} 0.73") in (tmp_path / "sweep" / "results.md").read_text()
    logs = sorted(p.name for p in (tmp_path / "sweep").glob("seed_*.log"))
    assert logs == ([] if jobs == 1 else ["seed_0.log", "seed_2.log", "seed_5.log"])
    if jobs > 1:  # each worker's output went to its log, not to the terminal
        assert "## " in (tmp_path / "sweep" / "seed_2.log").read_text()


@pytest.mark.parametrize("argv, message", [
    (["--experiment", "bench"], "--experiment: got 'bench'; allowed: an experiment with a "
                                "--seed option and metrics, one of .*lenet1989"),
    (["--experiment", "no_such"], "--experiment: got 'no_such'"),
    (["--experiment", "seed_table"], "--experiment: got 'seed_table'"),
    (["--seeds", "1,1"], "--seeds: got 1,1; allowed: distinct seeds"),
    (["--at-most", "test_misses"], "--at-most: got 'test_misses'; expected METRIC=VALUE"),
    (["--", "--seed", "3"], "experiment option --seed: it is set for each run"),
    (["--", "--workdir=x"], "experiment option --workdir: it is set for each run"),
    (["--experiment", "lenet1989", "--", "--variant", "modern", "--optimizer", "sdlm"],
     "option --optimizer: got 'sdlm'; it applies only with --variant 1989"),
])
def test_bad_sweeps_are_refused_before_any_run(tmp_path, argv, message):
    with pytest.raises(ConfigError, match=message):
        seeds.main(["--workdir", str(tmp_path / "sweep"), *argv])
    assert not (tmp_path / "sweep").exists()


@pytest.mark.parametrize("argv, message", [
    # abbreviations, which argparse takes for the flag: the run's own --seed K, given after
    # it, overrode it silently
    (["--", "--see", "3"], r"experiment option --seed \(given as '--see'\): it is set"),
    (["--", "--work=x"], r"experiment option --workdir \(given as '--work=x'\): it is set"),
    # counted no seed at all, or stopped the sweep only after its first run
    (["--at-most", "=100"], "--at-most: got '=100'; expected METRIC=VALUE"),
    (["--at-least", "test_accuracy=nan"], "--at-least: got 'test_accuracy=nan'; expected"),
])
def test_abbreviated_flags_and_bad_thresholds_are_refused_before_any_run(tmp_path, argv,
                                                                        message):
    own, experiment = seeds.split_argv(argv)
    with pytest.raises(ConfigError, match=message):
        seeds.main(["--workdir", str(tmp_path / "sweep"), "--seeds", "0", *own, "--", *SMALL,
                    *experiment])
    assert not (tmp_path / "sweep").exists()


def test_experiments_without_metrics_are_not_sweepable():
    """gradcheck and scaling have a --seed but return an exit status: a sweep of them would
    stop after its first run with nothing to summarise, so they are refused up front."""
    for name in ("gradcheck", "scaling"):
        with pytest.raises(ConfigError, match=f"--experiment: got '{name}'; allowed: an "
                                              "experiment with a --seed option and metrics"):
            seeds.experiment_module(name)
        assert name not in seeds.sweepable()


def test_a_bad_experiment_option_stops_the_sweep_before_any_run(tmp_path):
    with pytest.raises(SystemExit) as stop:
        seeds.main(["--workdir", str(tmp_path / "sweep"), "--", "--steps", "many"])
    assert stop.value.code == 2 and not (tmp_path / "sweep").exists()


def test_a_misspelt_metric_stops_the_sweep_after_its_first_run(tmp_path):
    with pytest.raises(ConfigError, match="--metrics: got test_acc; allowed: .*test_accuracy"):
        seeds.main(["--workdir", str(tmp_path / "sweep"), "--seeds", "0,1", "--metrics",
                    "test_acc", "--", *SMALL])
    assert sorted(p.name for p in (tmp_path / "sweep").glob("seed_*")) == ["seed_0"]


def test_with_workers_a_misspelt_metric_cancels_the_runs_not_yet_started(tmp_path):
    """Two workers, four seeds: the first run to finish fails the check, so only the two runs
    started before it (one worker per run) are made."""
    with pytest.raises(ConfigError, match="--metrics: got test_acc; allowed: .*test_accuracy"):
        seeds.main(["--workdir", str(tmp_path / "sweep"), "--seeds", "0,1,2,3", "--jobs", "2",
                    "--metrics", "test_acc", "--", *SMALL])
    made = sorted(p.name for p in (tmp_path / "sweep").glob("seed_*") if p.is_dir())
    assert made == ["seed_0", "seed_1"]


def test_the_per_seed_table_shows_what_differs_unless_told():
    stats = {f"m{i}": {"min": 0.0, "max": float(i % 2)} for i in range(20)}
    default = seeds.Sweep()
    assert seeds.per_seed_columns(default, list(stats), stats) == [
        f"m{i}" for i in range(1, 16, 2)]
    chosen = seeds.Sweep(metrics=("m0", "m2"))
    assert seeds.per_seed_columns(chosen, ["m0", "m2"], stats) == ["m0", "m2"]


def fake_run(directory, wrong):
    directory.mkdir(parents=True)
    (directory / "results.json").write_text(json.dumps({"misclassified": [
        {"index": index, "label": label, "predicted": predicted}
        for index, label, predicted in wrong]}))


def test_misclassified_examples_are_counted_across_seeds(tmp_path):
    """Three seeds by hand: example 4 missed by all three (as a 2 twice, a 7 once), 9 by two,
    11 and 12 by one each."""
    fake_run(tmp_path / "seed_0", [(4, 3, 2), (9, 1, 7), (11, 5, 6)])
    fake_run(tmp_path / "seed_1", [(4, 3, 7), (9, 1, 7)])
    fake_run(tmp_path / "seed_7", [(4, 3, 2), (12, 0, 6)])
    across = seeds.misclassified_across(tmp_path, [0, 1, 7])
    assert across["missed_by"] == {"1": 2, "2": 1, "3": 1}
    assert across["examples"] == [
        {"index": 4, "label": 3, "seeds": 3, "predicted": {"2": 2, "7": 1}},
        {"index": 9, "label": 1, "seeds": 2, "predicted": {"7": 2}},
        {"index": 11, "label": 5, "seeds": 1, "predicted": {"6": 1}},
        {"index": 12, "label": 0, "seeds": 1, "predicted": {"6": 1}}]
    assert "4 missed by at least one seed, 2 by at least half, 1 by all 3; by exactly k " \
           "seeds (k = 1..3): 2, 1, 1" in seeds.render_misclassified(across, 3)[1]
    assert seeds.confusions(across, top=3) == [(1, 7, 2), (3, 2, 2), (0, 6, 1)]
    assert "1\u21927 2, 3\u21922 2, 0\u21926 1, 3\u21927 1, 5\u21926 1" in \
        seeds.render_misclassified(across, 3)[-1]
    (tmp_path / "seed_1" / "results.json").write_text("{}")
    assert seeds.misclassified_across(tmp_path, [0, 1, 7]) is None


def test_the_ensemble_averages_the_runs_outputs_by_hand(tmp_path):
    """Two runs, three examples of labels 0, 1, 1: run A is right on 0 and 2, run B on 1 and
    2; their mean is right on 0 (0.6 vs 0.5) and 2, wrong on 1 (0.45 vs 0.55): one miss."""
    labels = np.array([0, 1, 1])
    for seed, outputs in ((0, [[0.9, 0.1], [0.9, 0.1], [0.2, 0.8]]),
                          (3, [[0.3, 0.9], [0.2, 0.8], [0.4, 0.6]])):
        (tmp_path / f"seed_{seed}").mkdir()
        results.save_test_outputs(tmp_path / f"seed_{seed}", np.array(outputs), labels)
    assert seeds.ensemble_of(tmp_path, [0, 3]) == {"runs": 2, "misses": 1, "error": 1 / 3,
                                                   "examples": 3}
    (tmp_path / "seed_5").mkdir()
    assert seeds.ensemble_of(tmp_path, [0, 3, 5]) is None
    results.save_test_outputs(tmp_path / "seed_5", np.zeros((3, 2)), np.array([0, 1, 0]))
    with pytest.raises(ValueError, match="different test examples"):
        seeds.ensemble_of(tmp_path, [0, 3, 5])
    outputs, saved_labels = results.load_test_outputs(tmp_path / "seed_3")
    assert outputs.dtype == np.float32 and saved_labels.tolist() == [0, 1, 1]


def test_a_first_run_refused_by_its_data_checks_leaves_the_sweeps_workdir_free(tmp_path):
    """The lecture's batch larger than its training set is a data check, made inside the
    first run after the sweep has written its config.json: that file is removed again, so
    the corrected command runs in the same workdir without --force."""
    sweep = str(tmp_path / "sweep")
    common = ["--seeds", "0", "--workdir", sweep, "--", *SMALL, "--procedure", "misclassified"]
    with pytest.raises(ConfigError, match="option --batch-size: got 5000; allowed: at most"):
        seeds.main(["--experiment", "lecture", *common, "--batch-size", "5000"])
    assert not (tmp_path / "sweep" / "config.json").exists()
    summary = seeds.main(["--experiment", "lecture", *common, "--batch-size", "8"])
    assert len(summary["per_seed"]) == 1


def test_the_ensemble_is_the_argmax_of_the_mean_not_one_run_nor_a_vote(tmp_path):
    """Three runs on three examples, all of label 0, chosen so that only the mean of the
    outputs gets all three right: by hand, the means are (0.583, 0.417), (0.733, 0.267),
    (0.6, 0.4); run 0 alone misses 2, run 1 misses 2, run 2 misses 1, a majority vote misses
    examples 0 and 2, and the per-class median misses example 0. It fails if the ensemble
    takes any one run's outputs, a vote or a median instead of the mean."""
    labels = np.array([0, 0, 0])
    runs = {0: [[0.9, 0.1], [0.4, 0.6], [0.45, 0.55]],
            1: [[0.4, 0.6], [0.9, 0.1], [0.45, 0.55]],
            2: [[0.45, 0.55], [0.9, 0.1], [0.9, 0.1]]}
    for seed, outputs in runs.items():
        (tmp_path / f"seed_{seed}").mkdir()
        results.save_test_outputs(tmp_path / f"seed_{seed}", np.array(outputs), labels)
    assert seeds.ensemble_of(tmp_path, [0, 1, 2]) == {"runs": 3, "misses": 0, "error": 0.0,
                                                      "examples": 3}
    assert seeds.ensemble_of(tmp_path, [1]) == {"runs": 1, "misses": 2, "error": 2 / 3,
                                                "examples": 3}


def test_the_mean_against_a_threshold_in_standard_errors_by_hand():
    """Values 1, 2, 3, 4: mean 2.5, sd sqrt(5/3), standard error sqrt(5/12); against 2 the
    mean lies 0.5 / sqrt(5/12) = 0.7746 standard errors above. Values that do not vary have
    no such distance."""
    stats = seeds.summary([1, 2, 3, 4])
    assert stats["standard_error"] == pytest.approx((5 / 12) ** 0.5, rel=1e-15)
    assert seeds.standard_errors_from([1, 2, 3, 4], 2) == pytest.approx(0.7745966692414834)
    assert seeds.standard_errors_from([1, 2, 3, 4], 3) == pytest.approx(-0.7745966692414834)
    assert seeds.standard_errors_from([7, 7, 7], 5) is None
    assert seeds.summary([7])["standard_error"] == 0
    tally = {"value": 100, "mean_in_standard_errors": 1.846}
    assert seeds.mean_against(102.7, tally) == (
        "; the mean, 102.7, lies 1.85 standard errors above 100")
    assert seeds.mean_against(7, {"value": 5, "mean_in_standard_errors": None}) == ""
