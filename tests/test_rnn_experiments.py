"""Smoke runs of the recurrent-net experiments at tiny sizes: results files and their keys."""
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import adding_problem, char_rnn, char_transformer, vanishing
from tests.helpers import assert_close_tree
from training.config import ConfigError

DESIGN_KEYS = {"experiment", "config", "environment", "metrics", "history", "seconds"}


def read_results(workdir):
    document = json.loads((workdir / "results.json").read_text())
    assert DESIGN_KEYS <= set(document)
    assert (workdir / "results.md").read_text().strip()
    return document


def test_adding_problem_data_has_the_stated_baseline():
    """Two markers, one per half; the target is the sum of the marked values; predicting 1
    has MSE 1/6."""
    x, targets = adding_problem.adding_batch(jax.random.key(0), 4000, 10)
    markers = np.asarray(x[:, :, 1])
    np.testing.assert_array_equal(markers[:, :5].sum(1), 1)
    np.testing.assert_array_equal(markers[:, 5:].sum(1), 1)
    np.testing.assert_allclose(targets[:, 0], np.sum(x[:, :, 0] * markers, 1), rtol=1e-6)
    assert float(jnp.mean((targets - 1) ** 2)) == pytest.approx(1 / 6, abs=0.01)


@pytest.mark.standard_promotion  # optax.adam
def test_adding_problem_runs_each_cell_and_reports_steps_to_threshold(tmp_path):
    metrics = adding_problem.main([
        "--workdir", str(tmp_path), "--cells", "gru", "--lengths", "6", "--steps", "20",
        "--eval-every", "10", "--hidden", "4", "--batch-size", "8", "--test-examples", "16",
        "--engine", "autodiff", "--progress-every", "0"])
    document = read_results(tmp_path)
    assert set(metrics) == {"gru_T6"}
    assert set(metrics["gru_T6"]) == {"final_test_mse", "steps_to_mse_below_0.01", "solved"}
    assert [h["step"] for h in document["history"] if h["cell"] == "gru"] == [10, 20]
    assert document["baseline_mse"] == pytest.approx(1 / 6)
    assert (tmp_path / "gru_T6" / "metrics.jsonl").exists()
    assert (tmp_path / "curves.png").stat().st_size > 5_000


@pytest.mark.standard_promotion  # optax.adam
def test_adding_problem_with_a_bidirectional_layer(tmp_path):
    """--bidirectional: the cell twice (params of its own each), the Dense reading both
    directions' final states (2 x hidden inputs)."""
    config = adding_problem.Config(cells=("gru",), hidden=4, bidirectional=True)
    model = adding_problem.build(config, "gru", 6)[0]
    params = model.init(jax.random.key(0), (-1, 6, 2))[1]
    forward_params, backward_params = params[0]
    assert jax.tree.map(jnp.shape, forward_params) == jax.tree.map(jnp.shape, backward_params)
    assert params[-1]["w"].shape == (8, 1)
    metrics = adding_problem.main([
        "--workdir", str(tmp_path), "--cells", "gru", "--lengths", "6", "--steps", "10",
        "--eval-every", "10", "--hidden", "4", "--batch-size", "8", "--test-examples", "16",
        "--bidirectional", "--progress-every", "0"])
    assert read_results(tmp_path)["config"]["bidirectional"] is True
    assert np.isfinite(metrics["gru_T6"]["final_test_mse"])


def test_adding_problem_refuses_steps_between_records(tmp_path):
    """--steps 15 with a record every 10 steps would train 20 and report 15."""
    with pytest.raises(ConfigError, match=r"option --steps: got 15; allowed: a multiple of "
                                          r"--eval-every \(10\)"):
        adding_problem.main(["--workdir", str(tmp_path), "--steps", "15", "--eval-every", "10",
                             "--cells", "gru", "--lengths", "6", "--hidden", "4",
                             "--batch-size", "8", "--test-examples", "16",
                             "--progress-every", "0"])
    assert not (tmp_path / "config.json").exists()


@pytest.mark.parametrize("steps", [150, 250])
def test_vanishing_refuses_training_steps_between_records(tmp_path, steps):
    """Records come every 100 steps: 150 would train 200."""
    with pytest.raises(ConfigError, match=rf"option --train-steps: got {steps}; allowed: at "
                                          r"most 100, or a multiple of 100"):
        vanishing.main(["--workdir", str(tmp_path), "--train-steps", str(steps), "--cells",
                        "elman_tanh", "--length", "6", "--hidden", "4", "--examples", "8",
                        "--batch-size", "8"])
    assert not (tmp_path / "config.json").exists()


@pytest.mark.standard_promotion  # optax.adam
def test_vanishing_keeps_compile_time_out_of_run_time(tmp_path, monkeypatch):
    """A clock that moves only while XLA compiles (1000 s a program): every second of it
    must land in "compile" (training, then the profiles in float32 and float64), none in
    "run"."""
    clock = [0.0]
    compile_program = jax.stages.Lowered.compile

    def slow_compile(self, *args, **kwargs):
        clock[0] += 1000.0
        return compile_program(self, *args, **kwargs)

    monkeypatch.setattr(jax.stages.Lowered, "compile", slow_compile)
    monkeypatch.setattr(time, "perf_counter", lambda: clock[0])
    vanishing.main(["--workdir", str(tmp_path), "--cells", "elman_tanh", "--length", "6",
                    "--hidden", "4", "--train-steps", "10", "--examples", "8",
                    "--batch-size", "8"])
    assert read_results(tmp_path)["seconds"] == {"compile": 3000.0, "run": 0.0}


@pytest.mark.standard_promotion  # optax.adam
def test_vanishing_reports_decay_rates_and_agrees_with_jax_grad(tmp_path):
    metrics = vanishing.main([
        "--workdir", str(tmp_path), "--cells", "elman_sigmoid,elman_tanh",
        "--length", "40", "--hidden", "4", "--train-steps", "10", "--examples", "8",
        "--batch-size", "8"])
    document = read_results(tmp_path)
    assert set(metrics) == {f"{c}/{s}/{d}" for c in ("elman_sigmoid", "elman_tanh")
                            for s in ("init", "trained") for d in ("float32", "float64")}
    for name, profile in document["profiles"].items():
        assert len(profile["manual"]) == 40
        bound = 1e-10 if name.endswith("float64") else 1e-5
        assert profile["max_rel_diff"] <= bound, name
    # sigmoid's derivative is at most 1/4, tanh's 1: the sigmoid net's gradient falls faster
    assert (metrics["elman_sigmoid/init/float64"]["decades_per_step"]
            > metrics["elman_tanh/init/float64"]["decades_per_step"] > 0)
    assert (tmp_path / "vanishing.png").stat().st_size > 5_000


@pytest.mark.standard_promotion  # optax.adam
def test_char_rnn_trains_evaluates_and_samples(tmp_path):
    metrics = char_rnn.main([
        "--workdir", str(tmp_path), "--layers", "2", "--hidden", "8", "--window", "16",
        "--batch-size", "4", "--epochs", "2", "--train-chars", "2000", "--eval-chars", "600",
        "--eval-streams", "4", "--sample-chars", "50", "--progress-every", "0",
        "--dropout", "0.2"])
    document = read_results(tmp_path)
    assert document["config"]["dropout"] == 0.2
    assert [h["epoch"] for h in document["history"]] == [1, 2]
    assert metrics["held_out_bpc"] == pytest.approx(metrics["held_out_nats"] / np.log(2))
    assert metrics["held_out_nats"] < np.log(65)  # better than uniform after two epochs
    samples = (tmp_path / "samples.txt").read_text()
    assert samples.count("ROMEO:\n") == 2 and "temperature 0.8" in samples
    assert len(document["samples"]["0.8"]) == len("ROMEO:\n") + 50


def test_char_rnn_refuses_more_text_than_there_is(tmp_path):
    """--eval-chars beyond the held-out text (10% of Tiny Shakespeare's 1,115,394
    characters) is refused, not cut to what there is."""
    tiny = ["--workdir", str(tmp_path), "--layers", "1", "--hidden", "4", "--window", "16",
            "--batch-size", "4", "--epochs", "1", "--eval-streams", "4", "--sample-chars", "5",
            "--progress-every", "0"]
    with pytest.raises(ConfigError, match=r"option --eval-chars: got 200000; allowed: at most "
                                          r"the 111539 held-out characters"):
        char_rnn.main([*tiny, "--train-chars", "200", "--eval-chars", "200000"])
    with pytest.raises(ConfigError, match=r"option --train-chars: got 2000000; allowed: at "
                                          r"most the 1003855 training characters"):
        char_rnn.main([*tiny, "--train-chars", "2000000", "--eval-chars", "200"])
    assert not (tmp_path / "config.json").exists()


def test_char_rnn_names_the_option_with_more_streams_than_the_text_holds(tmp_path):
    """More held-out streams than half the held-out characters: the error names
    --eval-streams and how many the text allows (it named no option)."""
    tiny = ["--workdir", str(tmp_path), "--layers", "1", "--hidden", "4", "--window", "8",
            "--batch-size", "4", "--epochs", "1", "--sample-chars", "5",
            "--progress-every", "0", "--train-chars", "2000"]
    with pytest.raises(ConfigError, match=r"option --eval-streams: got 32; allowed: at most "
                                          r"25, two of the 50 held-out characters"):
        char_rnn.main([*tiny, "--eval-chars", "50", "--eval-streams", "32"])
    with pytest.raises(ConfigError, match=r"option --batch-size: got 4; allowed: at most 2, "
                                          r"two of the 5 training characters"):
        char_rnn.as_streams(np.arange(5), 4)
    assert not (tmp_path / "config.json").exists()


@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_char_rnn_engines_agree_on_a_window_from_given_states(dropout):
    """The truncated-BPTT step of char_rnn by the manual and the autodiff engine, float64,
    and by the manual one with --recompute-every 3 (a first step kept, then a segment of 3);
    with dropout, all under the same key."""
    from nets import recurrent

    rng = np.random.default_rng(0)
    cells = [recurrent.lstm(4)]
    model = recurrent.sequence_model(cells, 5)
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64) + 0.3,
                          model.init(jax.random.key(0), (-1, 4, 5))[1])
    xs = jax.nn.one_hot(rng.integers(0, 5, (2, 4)), 5, dtype=jnp.float64)
    targets = jnp.asarray(rng.integers(0, 5, (2, 4)))
    carries = ((jnp.full((2, 4), -0.3), jnp.full((2, 4), 0.7)),)
    objective = char_rnn.nets.Objective(recurrent.sequence_cross_entropy(), 0.0)
    key = jax.random.key(1) if dropout else None
    results = [jax.jit(char_rnn.value_grad_and_carries(cells, objective, engine, dropout,
                                                       recompute_every))(
        params, xs, targets, carries, key)
        for engine, recompute_every in (("manual", None), ("autodiff", None), ("manual", 3))]
    assert_close_tree(results[0], results[1], "float64", "char_rnn engines")
    assert_close_tree(results[2], results[1], "float64", "char_rnn, recompute_every=3")
    if dropout:
        plain = char_rnn.value_grad_and_carries(cells, objective, "manual")(
            params, xs, targets, carries)
        assert abs(float(plain[0]) - float(results[0][0])) > 1e-3


@pytest.mark.standard_promotion  # optax.adam
def test_char_transformer_takes_the_blocks_activation_and_tied_embeddings(tmp_path):
    """--activation and --tie-embeddings reach the run's config (the model's use of them:
    tests/test_attention.py);
    a name outside nets.ACTIVATIONS is refused by the option's choices."""
    char_transformer.main([
        "--workdir", str(tmp_path), "--context", "8", "--features", "8", "--heads", "2",
        "--blocks", "1", "--batch-size", "4", "--steps-per-epoch", "2", "--epochs", "1",
        "--train-chars", "2000", "--eval-chars", "600", "--eval-batch", "16",
        "--sample-chars", "5", "--progress-every", "0", "--activation", "gelu_tanh",
        "--tie-embeddings"])
    document = read_results(tmp_path)
    assert document["config"]["activation"] == "gelu_tanh"
    assert document["config"]["tie_embeddings"] is True
    with pytest.raises(SystemExit):
        char_transformer.main(["--workdir", str(tmp_path / "bad"), "--activation", "swish"])


@pytest.mark.standard_promotion  # optax.adam
def test_char_transformer_trains_evaluates_and_samples(tmp_path):
    metrics = char_transformer.main([
        "--workdir", str(tmp_path), "--context", "8", "--features", "8", "--heads", "2",
        "--blocks", "1", "--dropout", "0.1", "--batch-size", "4", "--steps-per-epoch", "30",
        "--epochs", "2",
        "--train-chars", "2000", "--eval-chars", "600", "--eval-batch", "16",
        "--sample-chars", "50", "--progress-every", "0"])
    document = read_results(tmp_path)
    assert [h["epoch"] for h in document["history"]] == [1, 2]
    assert metrics["held_out_bpc"] == pytest.approx(metrics["held_out_nats"] / np.log(2))
    # below a uniform guess over the 65 characters (4.17 nats): 3.90-4.02 over seeds 0-9
    # with 2 x 30 steps (with 2 x 10, 4.10-4.23: too close to call)
    assert metrics["held_out_nats"] < np.log(65)
    assert len(document["held_out_nats_by_position"]) == 8
    assert metrics["held_out_nats"] == pytest.approx(np.mean(document["held_out_nats_by_position"]),
                                                     rel=1e-6)
    assert metrics["held_out_chars"] == 64 * 8  # 74 windows of 8, in 4 batches of 16
    assert {name: len(d) for name, d in document["attention_distance"].items()} == {
        "attention1": 2}
    assert all(0 <= d <= 7 for d in document["attention_distance"]["attention1"])
    assert (tmp_path / "attention.png").stat().st_size > 5_000
    samples = (tmp_path / "samples.txt").read_text()
    assert samples.count("ROMEO:\n") == 2
    assert len(document["samples"]["0.8"]) == len("ROMEO:\n") + 50


def test_char_transformer_held_out_windows_and_loss():
    """Window i: inputs ids[8i : 8i + 8], targets one further on; the chunked loss at each
    position equals the cross-entropy at that position averaged over the windows."""
    ids = np.arange(30)
    windows = char_transformer.held_out_windows(ids, 8)
    np.testing.assert_array_equal(windows, [np.arange(9), np.arange(8, 17), np.arange(16, 25)])
    model = char_rnn.nets.transformer_lm(5, 4, features=8, heads=2, blocks=1)
    params = model.init(jax.random.key(0), (-1, 4))[1]
    windows = jnp.asarray(np.random.default_rng(0).integers(0, 5, (6, 5)))
    log_p = jax.nn.log_softmax(model.apply(params, windows[:, :-1]))
    expected = [np.mean([-log_p[w, t, windows[w, t + 1]] for w in range(6)]) for t in range(4)]
    chunked = char_transformer.held_out_loss_by_position(model, params, windows, eval_batch=3)
    np.testing.assert_allclose(chunked, expected, rtol=1e-6)


def test_char_transformer_generation_matches_a_plain_loop():
    """At a temperature near 0 sampling is the argmax. The jitted generator, which runs a
    padded window of fixed size, gives the characters of a Python loop that runs the model
    on exactly the last `context` characters: the padding after them is invisible (causal)."""
    context, vocabulary = 5, 6
    model = char_rnn.nets.transformer_lm(vocabulary, context, features=8, heads=2, blocks=1)
    params = model.init(jax.random.key(3), (-1, context))[1]
    # float32 noise (key 11: the greedy text then alternates; most keys repeat one character)
    params = jax.tree.map(lambda a: a + 2.0 * jax.random.normal(jax.random.key(11), a.shape,
                                                                a.dtype), params)
    prime = np.array([1, 4, 2])
    chars = char_transformer.generate(model, params, prime, jax.random.key(0), 9, 1e-6,
                                      context)
    text = list(prime)
    for _ in range(9):
        window = jnp.asarray(text[-context:])[None]
        logits = model.apply(params, window)
        text.append(int(jnp.argmax(logits[0, -1])))
    np.testing.assert_array_equal(np.asarray(chars), text[len(prime):])
    assert len(set(text[len(prime):])) > 1


def test_char_transformer_with_lecuns_method_trains_and_refuses_what_it_cannot_do(tmp_path):
    """--optimizer sdlm (with dropout, h estimated without it) and --remat: h backpropagated
    every 3 updates; 2 short epochs bring the held-out loss below a uniform guess's log 65.
    Its options are refused with Adam, and --remat with --engine autodiff."""
    common = ["--context", "8", "--features", "8", "--heads", "2", "--blocks", "1",
              "--batch-size", "4", "--steps-per-epoch", "10", "--train-chars", "2000",
              "--eval-chars", "600", "--eval-batch", "16", "--sample-chars", "20",
              "--progress-every", "0"]
    metrics = char_transformer.main(["--workdir", str(tmp_path), *common, "--epochs", "2",
                                     "--optimizer", "sdlm", "--lr", "1e-3", "--mu", "1e-4",
                                     "--curvature-every", "3", "--dropout", "0.1",
                                     "--remat"])
    assert metrics["held_out_nats"] < np.log(65) and metrics["rejected_non_finite"] == 0
    config = read_results(tmp_path)["config"]
    assert config["optimizer"] == "sdlm" and config["remat"] is True
    with pytest.raises(ConfigError, match="option --mu: got 0.01; it applies only with "
                                          "--optimizer sdlm"):
        char_transformer.main([*common, "--mu", "0.01"])
    with pytest.raises(ConfigError, match="option --remat: got True; it applies only with "
                                          "--engine manual"):
        char_transformer.main([*common, "--remat", "--engine", "autodiff"])


def test_adding_problem_with_lecuns_method_runs_and_its_options_need_it(tmp_path):
    """--optimizer sdlm: h backpropagated through the LSTM every 5 steps; finite results. Its
    options are refused with Adam."""
    common = ["--cells", "lstm", "--lengths", "6", "--steps", "20", "--eval-every", "10",
              "--hidden", "4", "--batch-size", "8", "--test-examples", "16",
              "--progress-every", "0"]
    metrics = adding_problem.main(["--workdir", str(tmp_path), *common, "--optimizer", "sdlm",
                                   "--lr", "1e-2", "--mu", "1e-2", "--curvature-every", "5"])
    assert np.isfinite(metrics["lstm_T6"]["final_test_mse"])
    with pytest.raises(ConfigError, match="option --curvature-every: got 3; it applies only "
                                          "with --optimizer sdlm"):
        adding_problem.main([*common, "--curvature-every", "3"])


@pytest.mark.runs_long
def test_char_rnn_with_lecuns_method_trains_and_its_options_need_it(tmp_path):
    """--optimizer sdlm: h backpropagated through the stacked LSTM from the carried states
    every 4 windows, the gradients with --recompute-every 4; 2 short epochs bring the
    held-out loss below a uniform guess's log 65. Its options are refused with Adam, and
    --recompute-every with --engine autodiff."""
    common = ["--layers", "2", "--hidden", "8", "--window", "16", "--batch-size", "4",
              "--train-chars", "2000", "--eval-chars", "600", "--eval-streams", "4",
              "--sample-chars", "20", "--progress-every", "0"]
    metrics = char_rnn.main(["--workdir", str(tmp_path), *common, "--epochs", "2",
                             "--optimizer", "sdlm", "--lr", "1e-2", "--mu", "1e-3",
                             "--curvature-every", "4", "--recompute-every", "4"])
    assert metrics["held_out_nats"] < np.log(65) and metrics["rejected_non_finite"] == 0
    assert read_results(tmp_path)["config"]["optimizer"] == "sdlm"
    with pytest.raises(ConfigError, match="option --curvature-every: got 3; it applies only "
                                          "with --optimizer sdlm"):
        char_rnn.main([*common, "--curvature-every", "3"])
    with pytest.raises(ConfigError, match="option --recompute-every: got 4; it applies only "
                                          "with --engine manual"):
        char_rnn.main([*common, "--recompute-every", "4", "--engine", "autodiff"])
