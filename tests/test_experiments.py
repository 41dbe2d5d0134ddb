"""The experiments end to end: results files with the README's keys, and their headline numbers."""
import importlib
import json

import pytest

from experiments import gradcheck, lecture, seeds
from tests.helpers import F64, assert_refused_before_the_run
from training.config import parse

DESIGN_KEYS = {"experiment", "config", "environment", "metrics", "history", "seconds"}


def read_results(workdir):
    document = json.loads((workdir / "results.json").read_text())
    assert DESIGN_KEYS <= set(document)
    assert document["environment"]["backend"] == "cpu"
    assert (workdir / "results.md").read_text().strip()
    return document


@pytest.mark.slow
@pytest.mark.runs_long
def test_lecture_reaches_95_percent_on_the_digits(tmp_path):
    """The default run, as `make run` does it: test accuracy >= 0.95 (issue 2)."""
    metrics = lecture.main(["--workdir", str(tmp_path)])
    document = read_results(tmp_path)
    assert metrics["test_accuracy"] >= 0.95
    assert document["metrics"]["test_accuracy"] == metrics["test_accuracy"]
    assert document["metrics"]["gradient_report_passed"] is True
    assert len(document["restarts"]) == 5
    assert document["metrics"]["architecture"] == {
        "inputs": 64, "hidden_layers": 1, "hidden_units": 192, "outputs": 10}
    assert len(document["history"]) == document["metrics"]["stop_step"]
    assert (tmp_path / "curves.png").stat().st_size > 10_000


def test_lecture_rejects_bad_options(capsys):
    with pytest.raises(SystemExit):
        lecture.main(["--lr", "-1"])
    assert "argument --lr: got '-1'; allowed: > 0" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--batch-size", "64"], "option --batch-size: got 64; it applies only with --procedure "
                             "misclassified (got --procedure cost_checked)"),
    (["--procedure", "misclassified", "--perturbation", "0.01"],
     "option --perturbation: got 0.01; it applies only with --procedure cost_checked (got "
     "--procedure misclassified)"),
])
def test_lecture_refuses_an_option_its_procedure_ignores(tmp_path, argv, message):
    assert_refused_before_the_run(lecture.main, tmp_path,
                                  ["--steps", "10", "--restarts", "1", "--no-gradient-report",
                                   "--progress-every", "0", *argv], message)


@pytest.mark.parametrize("name", [*seeds.sweepable(), "gradcheck", "scaling"])
def test_a_negative_seed_is_refused_before_any_work(name, capsys):
    """NumPy's generators take no negative seed: --seed -1 is a bad option, not a traceback
    later in the run."""
    module = importlib.import_module(f"experiments.{name}")
    with pytest.raises(SystemExit) as exit_info:
        parse(module.Config, ["--seed", "-1"])
    assert exit_info.value.code == 2
    assert "argument --seed: got '-1'; allowed: >= 0" in capsys.readouterr().err


# Every model but AlexNet (its float64 check is in tests/test_models.py; here it would double
# the suite's longest test), in three runs of about 30 s that the test workers can share
CHECKED = [case.name for case in gradcheck.CASES if case.name != "alexnet_67x67"]
CHECK_GROUPS = [CHECKED[group::3] for group in range(3)]


def test_the_gradcheck_groups_cover_every_model_but_alexnet():
    assert sorted(sum(CHECK_GROUPS, [])) == sorted(CHECKED)
    assert len(CHECKED) == len(gradcheck.CASES) - 1


@pytest.mark.parametrize("names", CHECK_GROUPS, ids=["group0", "group1", "group2"])
def test_gradcheck_writes_every_check_and_passes(tmp_path, names):
    assert gradcheck.main(["--workdir", str(tmp_path), "--batch", "4",
                           "--models", ",".join(names)]) == 0
    document = read_results(tmp_path)
    checks = document["checks"]
    assert document["passed"] is True
    assert {c["model"] for c in checks} == set(names)
    assert {c["dtype"] for c in checks} == {"float64", "float32"}
    required = {"model", "layer", "param", "dtype", "rel_err_vs_autodiff",
                "rel_err_vs_finite_diff", "cosine", "by_hand", "wider_floats", "passed"}
    assert all(required <= set(c) for c in checks)
    assert document["metrics"]["by_hand"] is True
    assert document["metrics"]["wider_floats"] == []  # every float32 check ran in float32
    assert all(c["rel_err_vs_autodiff"] <= F64 for c in checks if c["dtype"] == "float64")
    assert (tmp_path / "errors.png").stat().st_size > 10_000


def test_gradcheck_checks_a_model_at_the_same_point_alone_or_after_others():
    """A case's parameters and batch come from its name, not its place in the list."""
    first, second = (case for case in gradcheck.CASES
                     if case.name in ("mlp_lecture_probabilities", "mlp_tanh_mse"))
    together = [row for row in gradcheck.run_checks(3, 0, [first, second])
                if row["model"] == second.name]
    alone = gradcheck.run_checks(3, 0, [second])
    assert [row["rel_err_vs_autodiff"] for row in together] == [
        row["rel_err_vs_autodiff"] for row in alone]
    assert [row["rel_err_vs_finite_diff"] for row in together] == [
        row["rel_err_vs_finite_diff"] for row in alone]


def test_gradcheck_exits_nonzero_when_a_check_fails(tmp_path, monkeypatch):
    import nets
    from tests.test_engines import broken_dense

    broken = gradcheck.Case(
        "broken", lambda: (nets.serial(broken_dense(3, "bad"), nets.Sigmoid(),
                                       nets.Dense(2, name="out")),
                           nets.lecture_objective(0.0)), (4,), 2)
    monkeypatch.setattr(gradcheck, "CASES", [broken])
    assert gradcheck.main(["--workdir", str(tmp_path), "--batch", "3"]) == 1
    assert json.loads((tmp_path / "results.json").read_text())["passed"] is False


def test_gradcheck_exits_nonzero_for_a_backward_by_jax_vjp(tmp_path, monkeypatch):
    """Its numbers agree with jax.grad's; its program is jax's, and every row of it fails."""
    import nets
    from tests.helpers import scale_layer

    cheat = gradcheck.Case(
        "cheat", lambda: (nets.serial(nets.Dense(3, name="hidden"), scale_layer("vjp"),
                                      nets.Dense(2, name="out")),
                          nets.lecture_objective(0.0)), (4,), 2)
    monkeypatch.setattr(gradcheck, "CASES", [cheat])
    assert gradcheck.main(["--workdir", str(tmp_path), "--batch", "3"]) == 1
    document = json.loads((tmp_path / "results.json").read_text())
    assert document["metrics"]["by_hand"] is False
    assert max(c["rel_err_vs_autodiff"] for c in document["checks"]) <= 1e-6
    assert {(c["by_hand"], c["passed"]) for c in document["checks"]} == {(False, False)}


@pytest.mark.parametrize("option", [["--clip-norm", "2"], ["--per-example-batch", "16"],
                                    ["--loop-repetitions", "1"], ["--noise-multiplier", "0"]])
def test_scaling_refuses_part_one_options_without_part_one(tmp_path, option):
    """--no-per-example leaves out part 1: its options would do nothing, and are refused."""
    from experiments import scaling

    tiny = ["--cpu-devices", "0", "--max-devices", "1", "--forms", "shard_map", "--engines",
            "manual", "--per-device-batch", "2", "--global-batch", "2", "--repetitions", "1"]
    assert_refused_before_the_run(
        scaling.main, tmp_path, [*tiny, "--no-per-example", *option],
        f"option {option[0]}: got {option[1]}")


def test_xla_profile_lists_the_steps_operations_with_their_source(tmp_path):
    """`experiments.xla_profile` in its own process (the trace flag must precede JAX): the
    LSTM step's thunks are instructions of the compiled program, the scan's per-step ones are
    called once a step, and their times fit in the traced steps' wall time (thunks run on
    at most the two intra-op threads and the caller's)."""
    import subprocess
    import sys

    subprocess.run([sys.executable, "-m", "experiments.xla_profile", "--workdir", str(tmp_path),
                    "--model", "lstm", "--size", "smallest", "--repeats", "3"],
                   check=True, capture_output=True)
    document = json.loads((tmp_path / "results.json").read_text())
    rows = document["thunks"]
    steps = 5  # bench.SMALLEST's LSTM runs 5 steps
    assert any(r["op_name"].endswith("dot_general") and r["calls_per_step"] == steps
               for r in rows)
    assert all(r["ms_per_step"] > 0 and r["shape"] for r in rows)
    assert [r["ms_per_step"] for r in rows] == sorted((r["ms_per_step"] for r in rows),
                                                      reverse=True)
    from experiments import xla_profile

    metrics = document["metrics"]
    inner = sum(r["ms_per_step"] for r in rows if r["opcode"] not in xla_profile.LOOP_OPCODES)
    assert metrics["thunks_ms"] == pytest.approx(inner, rel=1e-12)
    assert metrics["matched_share"] == pytest.approx(inner / metrics["traced_step_ms"], rel=1e-9)
    assert 0 < metrics["matched_share"] <= 3
    assert (tmp_path / "results.md").read_text().startswith("lstm_h8_t5/b4: step ")
    assert (tmp_path / "xla_profile.png").stat().st_size > 5_000


def test_xla_profile_reads_instructions_and_sums_their_events():
    """The compiled-program parser and the per-step sums, on a hand-written program text and
    trace: names, shapes, kinds and JAX operations; events of other names (the runtime's)
    ignored; durations in microseconds averaged over the steps."""
    from experiments import xla_profile

    text = "\n".join([
        '  %ynn_fusion.2 = f32[64,256]{1,0} fusion(%a, %b), kind=kCustom, calls=%c, '
        'metadata={op_name="jit(step)/while/body/dot_general" stack_frame_id=1}, '
        'backend_config={"fusion_config":{"kind":"__ynn_fusion"}}',
        '  ROOT %wrapped_add.3 = f32[288,1024]{1,0} fusion(%d, %e), kind=kLoop, calls=%f, '
        'metadata={op_name="jit(step)/add"}',
        "  %constant.4 = f32[] constant(0)"])
    table = xla_profile.instructions(text)
    assert table["ynn_fusion.2"] == {"opcode": "fusion", "kind": "__ynn_fusion",
                                     "shape": "f32[64,256]",
                                     "op_name": "jit(step)/while/body/dot_general"}
    assert table["wrapped_add.3"]["kind"] == "kLoop"
    assert table["constant.4"] == {"opcode": "constant", "kind": "constant", "shape": "f32[]",
                                   "op_name": ""}
    events = [{"name": "ynn_fusion.2", "dur": 100.0}, {"name": "ynn_fusion.2", "dur": 300.0},
              {"name": "wrapped_add.3", "dur": 50.0}, {"name": "ThunkExecutor::Execute",
                                                        "dur": 9000.0}]
    rows = xla_profile.thunk_rows(events, table, steps=2, step_s=1e-3)
    assert [(r["name"], r["calls_per_step"], r["ms_per_step"]) for r in rows] == [
        ("ynn_fusion.2", 1.0, 0.2), ("wrapped_add.3", 0.5, 0.025)]
    assert rows[0]["share"] == pytest.approx(0.2)
