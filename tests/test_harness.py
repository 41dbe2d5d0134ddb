"""The harness end to end through the lecture experiment: run directories, kill and resume,
numerical failures, determinism."""
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from experiments import lecture
from training import harness, results
from training.checkpoints import Checkpointer
from training.config import ConfigError
from training.harness import NonFiniteError

ROOT = pathlib.Path(__file__).resolve().parents[1]
SMALL = ["--restarts", "2", "--no-gradient-report", "--progress-every", "0"]


def final_state(workdir, config_argv):
    """The newest checkpoint of a run, restored independently of the experiment."""
    config, _ = lecture.parse(lecture.Config, config_argv)
    splits = lecture.load_splits(config.seed)
    model, _, procedure = lecture.build(config, splits)
    like = lecture.initial_states(model, procedure, config, splits[0][0].shape[1])
    return Checkpointer(workdir / "checkpoints", say=lambda m: None).restore_latest(like)


def metrics_lines(workdir):
    return (workdir / "metrics.jsonl").read_text().splitlines()


def test_run_directory_files(tmp_path):
    lecture.main(["--workdir", str(tmp_path), "--steps", "20", "--checkpoint-every", "10",
                  *SMALL])
    for name in ("config.json", "environment.json", "results.json", "results.md",
                 "metrics.jsonl", "curves.png"):
        assert (tmp_path / name).is_file(), name
    assert any((tmp_path / "tensorboard").iterdir())
    environment = json.loads((tmp_path / "environment.json").read_text())
    for key in ("jax", "jaxlib", "optax", "flax", "backend", "devices", "process_count",
                "git_commit", "command", "compilation_cache", "cpu", "cpu_count"):
        assert key in environment
    assert environment["cpu_count"] == os.cpu_count()
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["experiment"] == "lecture" and config["config"]["steps"] == 20
    assert [json.loads(line)["step"] for line in metrics_lines(tmp_path)] == list(range(1, 21))
    assert Checkpointer(tmp_path / "checkpoints").steps() == [10, 20]


def test_the_cpu_model_is_the_first_model_name_of_cpuinfo(tmp_path):
    """Two processors listed: the first's name, spaces trimmed; without the file, platform's
    answer (here compared with an empty string: the machine's architecture at least)."""
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC "
                       "9R14  \nflags\t\t: fpu avx512f\n\nprocessor\t: 1\nmodel name\t: "
                       "Other\n")
    assert results.cpu_model(cpuinfo) == "AMD EPYC 9R14"
    cpuinfo.write_text("processor\t: 0\nmodel name\t:\n")  # a name left empty: skipped
    assert results.cpu_model(cpuinfo) == results.cpu_model(tmp_path / "absent")
    assert results.cpu_model(tmp_path / "absent") != ""


def test_a_different_config_is_refused_unless_forced(tmp_path):
    base = ["--workdir", str(tmp_path), "--checkpoint-every", "10", *SMALL]
    lecture.main([*base, "--steps", "10"])
    with pytest.raises(ConfigError, match=r"different config \(steps: 10 -> 20\).*--force"):
        lecture.main([*base, "--steps", "20"])
    metrics = lecture.main([*base, "--steps", "20", "--force"])
    assert metrics["stop_step"] == 20
    assert len(metrics_lines(tmp_path)) == 20


def test_a_forced_change_of_config_is_recorded_with_the_results(tmp_path):
    """A finished run re-run under --force with another --lr trains nothing more: its
    results.json must not pass for the new config's alone, so config.json and results.json
    keep each earlier config and what changed, in order; a later plain resume keeps them."""
    base = ["--workdir", str(tmp_path), "--checkpoint-every", "10", "--steps", "10", *SMALL]
    first = lecture.main(base)
    assert results.FORCED not in results.read_results(tmp_path)
    again = lecture.main([*base, "--lr", "0.3", "--force"])
    assert again == first  # nothing retrained: the results are the first config's
    lecture.main([*base, "--lr", "0.5", "--force"])
    lecture.main([*base, "--lr", "0.5"])  # no change: nothing more recorded
    saved = json.loads((tmp_path / "config.json").read_text())
    document = results.read_results(tmp_path)
    assert saved["config"]["lr"] == document["config"]["lr"] == 0.5
    default_lr = lecture.Config().lr
    for forced in (saved[results.FORCED], document[results.FORCED]):
        assert [entry["changed"] for entry in forced] == [
            [f"lr: {default_lr} -> 0.3"], ["lr: 0.3 -> 0.5"]]
        assert [entry["config"]["lr"] for entry in forced] == [default_lr, 0.3]


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", ""])
def test_a_workdir_whose_config_json_is_not_a_config_is_refused(tmp_path, text):
    """A hand-edited or truncated config.json was a raw JSONDecodeError traceback."""
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(ConfigError, match=rf"--workdir {tmp_path}: config.json (cannot be read "
                                          r"as|holds a list, not) a run's config"):
        lecture.main(["--workdir", str(tmp_path), "--steps", "10", *SMALL])
    assert (tmp_path / "config.json").read_text() == text  # left as it was


def test_a_workdir_of_another_experiment_is_refused(tmp_path):
    """The same config under another experiment's name is still a different run."""
    lecture.main(["--workdir", str(tmp_path), "--steps", "10", "--checkpoint-every", "10",
                  *SMALL])
    config, args = lecture.parse(lecture.Config, ["--workdir", str(tmp_path), "--steps", "10",
                                                  "--checkpoint-every", "10", *SMALL])
    with pytest.raises(ConfigError, match=r"different config \(experiment: 'lecture' -> "
                                          r"'xor'\)"):
        harness.open_run("xor", config, args)


def test_a_config_refused_by_the_data_checks_leaves_the_workdir_free(tmp_path):
    """A batch larger than the training split is refused once the data are loaded, before
    config.json is written, so that the corrected command may use the same --workdir."""
    base = ["--workdir", str(tmp_path / "run"), "--steps", "10", "--checkpoint-every", "10",
            "--procedure", "misclassified", *SMALL]
    with pytest.raises(ConfigError, match="option --batch-size: got 1100; allowed: at most"):
        lecture.main([*base, "--batch-size", "1100"])
    assert not (tmp_path / "run" / "config.json").exists()
    assert lecture.main([*base, "--batch-size", "100"])["stop_step"] == 10


def test_train_needs_positive_step_counts(tmp_path):
    run = harness.Run("lecture", tmp_path, None, False)
    for total, every in ((0, 1), (5, 0)):
        with pytest.raises(ConfigError, match=rf"train: checkpoint_every \({every}\) and "
                                              rf"total_steps \({total}\) must be >= 1"):
            harness.train(run, lambda state, start, length: (state, {}), {},
                          total_steps=total, checkpoint_every=every)


def test_resume_needs_a_run(tmp_path):
    with pytest.raises(ConfigError, match="--resume: .* holds no run"):
        lecture.main(["--workdir", str(tmp_path / "empty"), "--resume", *SMALL])


def test_resuming_a_finished_run_does_no_work_and_reports_the_same(tmp_path):
    """The same metrics, history and compile and run seconds: those of the run that did the
    work (the re-run adds only its restore to the checkpoint seconds)."""
    argv = ["--workdir", str(tmp_path), "--steps", "30", "--checkpoint-every", "10", *SMALL]
    first = lecture.main(argv)
    first_results = json.loads((tmp_path / "results.json").read_text())
    second = lecture.main([*argv, "--resume"])
    second_results = json.loads((tmp_path / "results.json").read_text())
    assert first == second
    assert second_results["resumed_from_step"] == 30
    assert first_results["seconds"]["run"] > 0 and first_results["seconds"]["compile"] > 0
    for phase in ("compile", "run"):
        assert second_results["seconds"][phase] == first_results["seconds"][phase]
    assert second_results["seconds"]["checkpoint"] > first_results["seconds"]["checkpoint"]
    assert first_results["history"] == second_results["history"]


def test_forcing_fewer_steps_than_the_checkpoint_starts_again(tmp_path):
    """A finished 20-step run re-run with --force --steps 10 cannot continue from step 20:
    it starts again, and its results are those of a fresh 10-step run, not the old history
    under the new config."""
    base = ["--checkpoint-every", "10", *SMALL]
    lecture.main(["--workdir", str(tmp_path / "run"), "--steps", "20", *base])
    forced = lecture.main(["--workdir", str(tmp_path / "run"), "--steps", "10", "--force",
                           *base])
    fresh = lecture.main(["--workdir", str(tmp_path / "fresh"), "--steps", "10", *base])
    assert forced == fresh and forced["stop_step"] == 10
    document = json.loads((tmp_path / "run" / "results.json").read_text())
    assert document["config"]["steps"] == 10 and document["resumed_from_step"] == 0
    assert [r["step"] for r in document["history"]] == list(range(1, 11))
    assert metrics_lines(tmp_path / "run") == metrics_lines(tmp_path / "fresh")
    assert Checkpointer(tmp_path / "run" / "checkpoints").steps() == [10]


def test_an_infinite_option_resumes_its_own_run(tmp_path):
    """config.json stores inf as "inf"; the same command again is the same config."""
    argv = ["--workdir", str(tmp_path), "--steps", "10", "--checkpoint-every", "10",
            "--stop-tolerance", "inf", *SMALL]
    first = lecture.main(argv)
    assert json.loads((tmp_path / "config.json").read_text())["config"]["stop_tolerance"] == "inf"
    assert lecture.main(argv) == first


def test_same_config_and_seed_give_identical_metrics(tmp_path):
    argv = ["--steps", "30", "--checkpoint-every", "15", *SMALL]
    lecture.main(["--workdir", str(tmp_path / "a"), *argv])
    lecture.main(["--workdir", str(tmp_path / "b"), *argv])
    assert metrics_lines(tmp_path / "a") == metrics_lines(tmp_path / "b")
    other_seed = tmp_path / "c"
    lecture.main(["--workdir", str(other_seed), "--seed", "1", *argv])
    assert metrics_lines(tmp_path / "a") != metrics_lines(other_seed)


def test_a_nan_is_rolled_back_and_the_run_goes_on(tmp_path):
    argv = ["--workdir", str(tmp_path), "--steps", "30", "--checkpoint-every", "10",
            "--nan-steps", "12", *SMALL]
    lecture.main(argv)
    document = json.loads((tmp_path / "results.json").read_text())
    assert [r["rejected_non_finite"] for r in document["restarts"]] == [1, 1]
    records = [json.loads(line) for line in metrics_lines(tmp_path)]
    assert records[11]["energy/0"] == records[10]["energy/0"]  # step 12 undone
    assert records[12]["energy/0"] < records[11]["energy/0"]  # and the run went on


def test_repeated_nans_stop_with_the_step_and_parameter_named(tmp_path):
    argv = ["--workdir", str(tmp_path), "--steps", "40", "--checkpoint-every", "10",
            "--nan-steps", "15,16,17", "--max-failures", "3", *SMALL]
    with pytest.raises(NonFiniteError, match=r"first at step 15 .*in parameter hidden1\.b"):
        lecture.main(argv)
    assert Checkpointer(tmp_path / "checkpoints").steps() == [10]


@pytest.mark.slow
def test_killed_and_resumed_run_is_bitwise_identical_to_an_uninterrupted_one(tmp_path):
    """A real subprocess, a real SIGKILL after its second checkpoint, then a plain re-run.
    The uninterrupted run goes on beside the other two (alone on the 2-core CPU: 95 s against
    115 s one after the other)."""
    config_argv = ["--steps", "1500", "--checkpoint-every", "100", *SMALL]
    command = [sys.executable, "-m", "experiments.lecture", *config_argv]
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "CI": "1"}
    environment.pop("JAX_DISABLE_MOST_OPTIMIZATIONS", None)  # runs long (tests/conftest.py)
    killed, whole = tmp_path / "killed", tmp_path / "whole"

    def start(workdir, log):
        with open(tmp_path / log, "wb") as stderr:
            return subprocess.Popen([*command, "--workdir", str(workdir)], cwd=ROOT,
                                    env=environment, stdout=subprocess.DEVNULL, stderr=stderr)

    uninterrupted_run = start(whole, "whole.log")
    process = start(killed, "killed.log")
    checkpoints = Checkpointer(killed / "checkpoints", say=lambda m: None)

    def valid_steps():
        try:  # the run may be removing an older checkpoint as it is listed
            return [s for s in checkpoints.steps() if checkpoints.is_valid(s)]
        except OSError:
            return []

    deadline = time.monotonic() + 300
    while len(valid_steps()) < 2 and process.poll() is None:
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail("the run wrote no two valid checkpoints in 300 s")
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    interrupted_at = max(checkpoints.steps())
    assert interrupted_at < 1500

    resumed_run = start(killed, "resumed.log")
    for run, log in ((resumed_run, "resumed.log"), (uninterrupted_run, "whole.log")):
        assert run.wait() == 0, (tmp_path / log).read_text()[-3000:]
    resumed = json.loads((killed / "results.json").read_text())
    uninterrupted = json.loads((whole / "results.json").read_text())
    assert resumed["resumed_from_step"] >= 100
    assert resumed["metrics"] == uninterrupted["metrics"]
    assert resumed["history"] == uninterrupted["history"]
    assert metrics_lines(killed) == metrics_lines(whole)
    (step_a, state_a), (step_b, state_b) = (final_state(w, config_argv) for w in (killed, whole))
    assert step_a == step_b == 1500
    for a, b in zip(jax.tree.leaves(state_a), jax.tree.leaves(state_b)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


CACHE_PROBE = """
import dataclasses, json, pathlib, sys
import jax, jax.numpy as jnp
from training import config, harness
hits = []
jax.monitoring.register_event_listener(
    lambda event, **kw: hits.append(event) if event.endswith("cache_hits") else None)
if sys.argv[1] == "open_run":
    Empty = dataclasses.make_dataclass("Empty", [], frozen=True)
    args = config.HarnessArgs(pathlib.Path(sys.argv[2]), False, False)
    harness.open_run("probe", Empty(), args, compilation_cache=False)
    directory = None
else:
    directory = harness.use_compilation_cache()
jax.jit(lambda x: jnp.sin(x) * 3.0 + 1.0)(jnp.arange(5.0)).block_until_ready()
print(json.dumps({"directory": directory, "hits": len(hits)}))
"""


def cache_probe(tmp_path, *argv, **env):
    """Run CACHE_PROBE in a fresh process with NETS_CACHE_DIR in tmp_path and no compilation
    cache of the test suite's own; returns its JSON line."""
    environment = {k: v for k, v in os.environ.items()
                   if not k.startswith(("JAX_COMPILATION_CACHE", "JAX_PERSISTENT_CACHE",
                                        "NETS_COMPILATION_CACHE"))}
    environment.update(PYTHONPATH=str(ROOT), NETS_CACHE_DIR=str(tmp_path / "cache"), **env)
    completed = subprocess.run([sys.executable, "-c", CACHE_PROBE, *argv], cwd=ROOT,
                               env=environment, capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr
    return json.loads(completed.stdout.splitlines()[-1])


def test_the_compilation_cache_serves_a_second_process(tmp_path):
    default = tmp_path / "cache" / "jax-compilation"
    first = cache_probe(tmp_path, "cache")
    assert first == {"directory": str(default), "hits": 0}
    assert any(default.iterdir())
    second = cache_probe(tmp_path, "cache")
    assert second["directory"] == str(default) and second["hits"] >= 1


def test_the_compilation_cache_can_be_moved_or_turned_off(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    assert cache_probe(tmp_path, "cache", NETS_COMPILATION_CACHE=str(elsewhere)) == {
        "directory": str(elsewhere), "hits": 0}
    assert any(elsewhere.iterdir())
    assert cache_probe(tmp_path, "cache", NETS_COMPILATION_CACHE="off") == {
        "directory": None, "hits": 0}
    assert not (tmp_path / "cache").exists()


def _cache_entry(directory, key, size, used_s, recorded_s=None):
    """A fake cache entry of `size` bytes (sparse: no disk), last used `used_s` seconds after
    the epoch, with JAX's own record of a later use when `recorded_s` is given."""
    entry = directory / f"{key}-cache"
    with open(entry, "wb") as file:
        file.truncate(size)
    os.utime(entry, (used_s, used_s))
    if recorded_s is not None:
        (directory / f"{key}-atime").write_bytes((recorded_s * 10**9).to_bytes(8, "little"))
    return entry


def test_pruning_keeps_the_most_recently_used_entries_within_the_limit(tmp_path):
    """Oldest use first (a file's times, or JAX's record where it is later), until the sizes
    sum to at most the limit; the records go with their entries."""
    for key, used, recorded in (("k0", 1000, 9000), ("k1", 2000, None), ("k2", 3000, None),
                                ("k3", 4000, 1500), ("k4", 5000, None)):
        _cache_entry(tmp_path, key, 100, used, recorded)
    assert harness.prune_compilation_cache(tmp_path, 250) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k0-atime", "k0-cache", "k4-cache"]
    assert harness.prune_compilation_cache(tmp_path, 250) == 0
    assert harness.prune_compilation_cache(tmp_path / "absent", 0) == 0


def test_the_cache_is_pruned_when_turned_on_and_not_on_each_write(tmp_path):
    """Three entries of 1 GiB (sparse) in the default directory: the oldest goes when the
    cache is turned on, leaving the 2 GiB limit; the process's own entries are then written
    beside the other two without JAX's eviction, which would have removed one (and fails
    on entries without its records)."""
    default = tmp_path / "cache" / "jax-compilation"
    default.mkdir(parents=True)
    kept = [_cache_entry(default, key, 2**30, used) for key, used in (
        ("old", 1000), ("newer", 2000), ("newest", 3000))][1:]
    assert cache_probe(tmp_path, "cache") == {"directory": str(default), "hits": 0}
    entries = {p.name for p in default.glob("*-cache")}
    assert "old-cache" not in entries and {p.name for p in kept} <= entries
    written = entries - {p.name for p in kept}
    assert written and all(name.startswith("jit_") for name in written)
    assert not list(default.glob("*-atime"))


def test_a_benchmark_run_compiles_cold_even_with_a_user_cache(tmp_path):
    users = {"JAX_COMPILATION_CACHE_DIR": str(tmp_path / "users"),
             "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    assert cache_probe(tmp_path, "cache", **users) == {"directory": users[
        "JAX_COMPILATION_CACHE_DIR"], "hits": 0}
    entries = sorted((tmp_path / "users").iterdir())
    assert entries
    probe = cache_probe(tmp_path, "open_run", str(tmp_path / "run"), **users)
    assert probe == {"directory": None, "hits": 0}
    assert sorted((tmp_path / "users").iterdir()) == entries
    environment = json.loads((tmp_path / "run" / "environment.json").read_text())
    assert environment["compilation_cache"] is None


def test_an_unwritable_workdir_is_a_config_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match=r"--workdir: cannot create .*file/run"):
        lecture.main(["--workdir", str(blocker / "run"), *SMALL])
