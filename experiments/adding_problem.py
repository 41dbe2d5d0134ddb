"""The adding problem: can a recurrent net carry two numbers across T steps?

    python -m experiments.adding_problem [--workdir DIR] [--cells elman,lstm,gru]
        [--lengths 50,100,200] [--steps 3000] [--engine manual|autodiff] [--bidirectional]
        [--optimizer adam|sdlm [--mu 1e-3] [--curvature-every 10]]

--optimizer sdlm steps eta / (mu + h) (LeCun's diagonal Levenberg-Marquardt), h
backpropagated through time on the step's batch every --curvature-every steps. It solved no
LSTM run at 8 settings tried (README, the experiments table), where Adam does.

Hochreiter and Schmidhuber 1997 (section 5.4, experiment 4) proposed it; we use the form of
Le et al. 2015 and Arjovsky et al. 2016: each input step is a pair (value ~ U(0, 1), marker),
exactly two markers are 1, one in the first half of the sequence and one in the second, and
the target is the sum of the two marked values. (The 1997 original draws values from [-1, 1]
and targets 0.5 + (X1 + X2)/4.) Predicting the mean, 1, gives MSE = Var(X1 + X2) = 1/6 =
0.167: a net has learned the task once it is far below that; "solved" here is test MSE < 0.01.

Each cell (tanh Elman, LSTM, GRU; `nets.recurrent`) reads the sequence, and a Dense layer maps
its last hidden state to the prediction: `sequence_model([cell], 1, last_step=True)`, mean
squared error, Adam with the gradient's global norm clipped to 1, fresh batches every step.
Training runs through the harness (`training.harness.train`: checkpoints, metrics.jsonl) with
one sub-run directory per cell and length; every `--eval-every` steps the test MSE on a fixed
set of `--test-examples` sequences is recorded.

Reported (results.json "metrics" and results.md): for each cell and T, the final test MSE and
the first recorded step with test MSE < 0.01 (null if never).

Expected (the literature): Elman nets fail beyond T of a few tens (Hochreiter and Schmidhuber
1997; Le et al. 2015), LSTM and GRU solve T = 200 within a few thousand steps.

Measured on the shared 2-core CPU (jax 0.10.2, float32), defaults (hidden 64, batch 64, 2,500
steps, lr 3e-3, manual engine), 6 min 50 s in all (compile 92 s, run 305 s, under a load of
about 5 from other jobs); steps to < 0.01 are at a resolution of --eval-every = 100:

    cell    T    final test MSE   steps to MSE < 0.01
    elman   50   0.159            never
    lstm    50   0.00048          700
    gru     50   0.00091          400
    elman  100   0.170            never
    lstm   100   0.00042          1400
    gru    100   0.00058          400
    elman  200   0.171            never
    lstm   200   0.00096          1600
    gru    200   0.00049          600

The tanh Elman net stays at the baseline (0.167) from T = 50 on, while LSTM and GRU solve every
length, GRU in fewer steps; LSTM needs more steps as T grows. With the same settings the Elman
net does learn short sequences (`--cells elman --lengths 10,20`): T = 10 solved after 900 steps
(final MSE 0.0015); T = 20 below 0.01 at 1,200 steps but unstable, ending at 0.017.

--bidirectional (2026-12-04, same defaults): `sequence_model(..., bidirectional=True)`, the cell
twice with params of its own, one run from the last step, and the Dense reading each
direction's final output (`recurrent.FinalStates`). Each direction then needs to carry only
the marker in its own second half, at most T/2 steps:

    cell    T    final test MSE   steps to MSE < 0.01   one direction (same run of the code)
    elman   20   0.0028           600                   0.017, 1,200
    elman   50   0.170            never                 0.159, never
    lstm   100   0.00093          1400                  0.00042, 1400 (table above)
"""
from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import nets
from nets import recurrent
from nets.gradcheck import named_parameters
from training import optim, plots, procedures, results
from training.config import ConfigError, check_applicable, option, parse, run_main
from training.harness import Run, open_run, train

EXPERIMENT = "adding_problem"
THRESHOLD = 0.01
BASELINE_MSE = 1 / 6  # predicting 1 for every sequence: Var(U1 + U2) = 2/12


@dataclasses.dataclass(frozen=True)
class Config:
    cells: tuple[str, ...] = option(("elman", "lstm", "gru"), "recurrent cells to train",
                                    choices=("elman", "elman_tanh", "elman_sigmoid", "lstm",
                                             "lstm_peephole", "gru", "gru_reset_after"))
    lengths: tuple[int, ...] = option((50, 100, 200), "sequence lengths T", ge=2)
    hidden: int = option(64, "hidden units of the cell", ge=1)
    bidirectional: bool = option(False, "a bidirectional layer (the cell twice, one run from "
                                        "the last step; the Dense reads both final states)")
    batch_size: int = option(64, "sequences per step", ge=1)
    steps: int = option(2500, "optimizer steps per cell and length, a multiple of "
                              "--eval-every", ge=1)
    optimizer: str = option("adam", "adam, or LeCun's diagonal Levenberg-Marquardt (sdlm)",
                            choices=("adam", "sdlm"))
    lr: float = option(3e-3, "learning rate (sdlm: eta)", gt=0)
    mu: float = option(1e-3, "sdlm: the damping mu of eta / (mu + h)", gt=0)
    curvature_every: int = option(10, "sdlm: updates between estimates of h", ge=1)
    clip: float = option(1.0, "clip the gradient's global norm to this (0: no clipping)", ge=0)
    eval_every: int = option(100, "steps between test-MSE records", ge=1)
    checkpoint_every: int = option(10, "records between checkpoints", ge=1)
    test_examples: int = option(1000, "fixed test sequences", ge=1)
    engine: str = option("manual", "gradient engine", choices=tuple(nets.engines.ENGINES))
    seed: int = option(0, "seed of initialisation, data and test set", ge=0)
    progress_every: int = option(5, "records between progress lines off a terminal", ge=0)


def adding_batch(key: jax.Array, batch: int, length: int, dtype=jnp.float32):
    """A batch of the adding problem: x (batch, length, 2) = (value, marker), t (batch, 1).

    One marker uniformly in [0, length // 2), the other in [length // 2, length).
    """
    value_key, first_key, second_key = jax.random.split(key, 3)
    values = jax.random.uniform(value_key, (batch, length), dtype)
    half = length // 2
    first = jax.random.randint(first_key, (batch,), 0, half)
    second = jax.random.randint(second_key, (batch,), half, length)
    markers = jax.nn.one_hot(first, length, dtype=dtype) + jax.nn.one_hot(second, length,
                                                                          dtype=dtype)
    x = jnp.stack([values, markers], axis=-1)
    return x, jnp.sum(values * markers, axis=1, keepdims=True)


def make_optimizer(lr, clip: float) -> optax.GradientTransformation:
    """Adam (lr a float or an optax schedule), after clipping the gradient's global norm to
    `clip` (none for clip = 0)."""
    adam = optax.adam(lr)
    return optax.chain(optax.clip_by_global_norm(clip), adam) if clip > 0 else adam


def sdlm_optimizer(lr, mu: float, clip: float) -> optax.GradientTransformation:
    """LeCun's diagonal Levenberg-Marquardt steps lr / (mu + h) (h handed in by the procedure),
    after clipping the gradient's global norm to `clip` (none for clip = 0)."""
    sdlm = optim.diagonal_levenberg_marquardt(lr, mu)
    return optax.chain(optax.clip_by_global_norm(clip), sdlm) if clip > 0 else sdlm


def build(config, cell_name: str, length: int, dtype=jnp.float32):
    """(model, objective, procedure) for one cell and length; the procedure's monitor measures
    the fixed test set."""
    cell = recurrent.make_cell(cell_name, config.hidden)
    model = recurrent.sequence_model([cell], 1, last_step=True,
                                     bidirectional=config.bidirectional, name=cell_name)
    objective = nets.Objective(nets.mean_squared_error(), 0.0)
    x_test, t_test = adding_batch(jax.random.fold_in(jax.random.key(config.seed), 10**6 + length),
                                  config.test_examples, length, dtype)

    def monitor(params):
        return {"test_mse": jnp.mean((model.apply(params, x_test) - t_test) ** 2)}

    sdlm = config.optimizer == "sdlm"
    optimizer = (sdlm_optimizer(config.lr, config.mu, config.clip) if sdlm
                 else make_optimizer(config.lr, config.clip))
    procedure = procedures.online(
        model, objective, optimizer,
        lambda key: adding_batch(key, config.batch_size, length, dtype),
        engine=nets.get_engine(config.engine), steps_per_record=config.eval_every,
        monitor=monitor, curvature_every=config.curvature_every if sdlm else None)
    return model, objective, procedure


def first_below(history: list[dict], threshold: float = THRESHOLD) -> int | None:
    """The first recorded step at which test_mse < threshold (None if never)."""
    return next((h["step"] for h in history if h["test_mse"] < threshold), None)


def train_one(config, run, cell_name: str, length: int, say=print):
    """Train one cell at one length in its own sub-run directory: (history, outcome, params)."""
    model, _, procedure = build(config, cell_name, length)
    params = model.init(jax.random.fold_in(jax.random.key(config.seed), length),
                        (-1, length, 2))[1]
    name = f"{cell_name}_T{length}"
    sub_run = Run(EXPERIMENT, run.workdir / name, run.config, run.resuming)
    sub_run.workdir.mkdir(parents=True, exist_ok=True)
    records = config.steps // config.eval_every  # a whole number (check_steps)
    outcome = train(
        sub_run,
        lambda state, start, count: procedures.run_steps(procedure, state, start, count),
        procedure.init(params, jax.random.fold_in(jax.random.key(config.seed + 1), length)),
        total_steps=records, checkpoint_every=config.checkpoint_every, keep=1,
        progress_every=config.progress_every, say=say,
        leaf_names=[f"{layer}.{param}" for layer, param, _ in named_parameters(model, params)])
    history = [{"cell": cell_name, "T": length, "step": r["step"] * config.eval_every,
                "train_mse": 2 * r["energy"], "test_mse": r["test_mse"]}
               for r in outcome.history]
    return history, outcome, outcome.state.params


ONLY_WITH = dict.fromkeys(("mu", "curvature_every"), ("optimizer", "sdlm"))


def check_steps(config) -> None:
    """Refuse a --steps that is not a whole number of --eval-every records: the run would
    train up to the next record and report fewer steps than it took."""
    if config.steps % config.eval_every:
        raise ConfigError(f"option --steps: got {config.steps}; allowed: a multiple of "
                          f"--eval-every ({config.eval_every})")


def main(argv=None):
    config, args = parse(Config, argv, __doc__, prog=f"python -m experiments.{EXPERIMENT}")
    check_applicable(config, ONLY_WITH)
    check_steps(config)
    run = open_run(EXPERIMENT, config, args)
    history, rows, seconds = [], [], {"compile": 0.0, "run": 0.0, "checkpoint": 0.0}
    curves = {}
    for length in config.lengths:
        for cell_name in config.cells:
            tick = time.perf_counter()
            run_history, outcome, _ = train_one(config, run, cell_name, length)
            for key in seconds:
                seconds[key] += outcome.seconds[key]
            history += run_history
            final = run_history[-1]["test_mse"]
            rows.append({"cell": cell_name, "T": length, "final_test_mse": final,
                         "steps_to_mse_below_0.01": first_below(run_history),
                         "solved": final < THRESHOLD,
                         "rejected_non_finite": int(outcome.state.guard.rejected),
                         "seconds": time.perf_counter() - tick})
            print(f"{cell_name:>14s} T={length:<4d} final test MSE {final:.4g} "
                  f"(steps to < {THRESHOLD}: {rows[-1]['steps_to_mse_below_0.01']})", flush=True)
            curves[(cell_name, length)] = (np.array([h["step"] for h in run_history]),
                                           np.array([h["test_mse"] for h in run_history]))
    metrics = {f"{r['cell']}_T{r['T']}": {k: r[k] for k in (
        "final_test_mse", "steps_to_mse_below_0.01", "solved")} for r in rows}
    results.write_results(run.workdir, EXPERIMENT, dataclasses.asdict(config), metrics, history,
                          seconds, runs=rows, baseline_mse=BASELINE_MSE, threshold=THRESHOLD)
    plots.save_curves(run.workdir / "curves.png", [
        {"xlabel": "step", "ylabel": f"test MSE, T = {length}", "log": True,
         "series": {cell: curves[(cell, length)] for cell in config.cells}}
        for length in config.lengths], title="The adding problem")
    table = results.markdown_table(rows, ["cell", "T", "final_test_mse",
                                          "steps_to_mse_below_0.01", "solved", "seconds"])
    results.save_and_print_table(run.workdir, "\n".join([
        f"## The adding problem: test MSE after {config.steps} steps (baseline predicting 1: "
        f"{BASELINE_MSE:.3f}; solved: < {THRESHOLD})", table,
        f"compile {seconds['compile']:.1f} s, run {seconds['run']:.1f} s, checkpoints "
        f"{seconds['checkpoint']:.1f} s. Results in {run.workdir}"]))
    return metrics


if __name__ == "__main__":
    run_main(main, EXPERIMENT)
