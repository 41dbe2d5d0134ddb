"""The lecture end to end on scikit-learn's embedded 8x8 digits (no network, no data files).

    python -m experiments.lecture [--workdir DIR] [--steps 2000] [--lr 0.25] [--l2 1.0] ...
    python -m experiments.lecture --workdir DIR --resume     # continue after a kill

1. STEP 0: 64 inputs (features), 10 outputs (classes), one hidden layer of 3 x 64 = 192
   sigmoid units, sigmoid outputs; the lecture's objective (sigmoid cross-entropy summed over
   the 10 outputs, mean over examples, plus lambda/(2m) sum w^2 over weights).
2. A gradient report at initialisation: the hand-written backward against jax.grad (float64
   and float32) and against central finite differences (float64), per layer and parameter.
3. Full-batch gradient descent with the lecture's cost check: a step that does not lower E is
   undone and replaced by a small random perturbation; stop when E stops decreasing.
4. Five random restarts (one after another), the one with the lowest held-out error kept.
5. Train, held-out and test accuracy; curves.png (E and error against step, train and
   held-out).

Splits: the 1,797 digits shuffled with the seed, 60% train / 20% held-out / 20% test.
Runs through the harness (training/harness.py): config.json, environment.json, metrics.jsonl,
TensorBoard events, checkpoints every --checkpoint-every steps (resumable, bitwise identical),
results.json (the README's keys, plus "gradient_report" and "restarts"), results.md, curves.png.

Measured on the 2-core CPU (jax 0.10.2, defaults, 2026-12-03): 45 s in all (training 18 s,
compile 4 s; training took 46 s with the restarts vmapped, see `advance_each_restart`); test
accuracy 0.9805, held-out 0.9583, train 0.9731; gradient report relative error manual vs
jax.grad about 1e-16 (float64), 1e-7 (float32).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

import nets
from nets.gradcheck import gradient_report, named_parameters
from training import data, metrics, optim, plots, procedures, results
from training.config import ConfigError, check_applicable, option, parse, run_main
from training.harness import open_run, train

EXPERIMENT = "lecture"


@dataclasses.dataclass(frozen=True)
class Config:
    seed: int = option(0, "seed of the split, the initialisations and the perturbations", ge=0)
    steps: int = option(2000, "most gradient-descent steps per restart", ge=1)
    lr: float = option(0.25, "learning rate eta", gt=0)
    l2: float = option(1.0, "lambda of the L2 penalty lambda/(2m) sum w^2", ge=0)
    restarts: int = option(5, "random initialisations, the best kept on held-out error", ge=1)
    hidden_factor: float = option(3.0, "STEP 0: hidden units per input", ge=3, le=4)
    hidden_layers: int = option(1, "hidden layers of equal width", ge=0)
    perturbation: float = option(1e-3, "std of the perturbation after a rejected step "
                                "(--procedure cost_checked)", ge=0)
    stop_window: int = option(100, "steps over which E must keep decreasing", ge=1)
    stop_tolerance: float = option(1e-4, "least relative decrease over the window (inf: stop "
                                   "once the window is full)", ge=0, finite=False)
    engine: str = option("manual", "gradient engine", choices=tuple(nets.engines.ENGINES))
    procedure: str = option("cost_checked", "cost_checked: full-batch descent with the cost "
                            "check; misclassified: steps on batches of misclassified examples",
                            choices=("cost_checked", "misclassified"))
    batch_size: int = option(32, "misclassified examples per step (--procedure misclassified)",
                             ge=1)
    checkpoint_every: int = option(500, "steps between checkpoints", ge=1)
    keep_checkpoints: int = option(3, "checkpoints kept", ge=1)
    nan_factor: float = option(0.5, "learning-rate factor after a non-finite step", gt=0, lt=1)
    max_failures: int = option(5, "consecutive non-finite steps before the run stops", ge=1)
    nan_steps: tuple[int, ...] = option((), "inject a NaN gradient at these steps (testing)",
                                        ge=1)
    progress_every: int = option(500, "steps between progress lines off a terminal", ge=0)
    gradient_report: bool = option(True, "check the gradients at initialisation first")


# Options that act on one procedure only; given with the other they are refused.
ONLY_WITH = {"perturbation": ("procedure", "cost_checked"),
             "batch_size": ("procedure", "misclassified")}


def load_splits(seed):
    images, labels = data.load_digits()
    parts = data.split(images, labels, (0.6, 0.2, 0.2), seed=seed)
    return [(jnp.asarray(x), jnp.asarray(data.one_hot(y, 10))) for x, y in parts]


def build(config, splits):
    """The model, objective and cost-checked procedure the config describes."""
    (x_train, y_train), (x_held, y_held), _ = splits
    model = nets.build_mlp(x_train.shape[1], 10, hidden_layers=config.hidden_layers,
                           hidden_factor=config.hidden_factor)
    objective = nets.lecture_objective(config.l2)

    def monitor(params):
        return {
            "train_error": metrics.classification_error(model, params, x_train, y_train),
            "held_out_error": metrics.classification_error(model, params, x_held, y_held),
            "held_out_energy": objective.value(params, model.apply(params, x_held), y_held),
        }

    if config.batch_size > x_train.shape[0]:
        raise ConfigError(f"option --batch-size: got {config.batch_size}; allowed: at most the "
                          f"{x_train.shape[0]} training examples")
    guard = procedures.Guard(factor=config.nan_factor, max_failures=config.max_failures,
                             nan_steps=tuple(s - 1 for s in config.nan_steps))
    common = dict(engine=nets.get_engine(config.engine), stop_window=config.stop_window,
                  stop_tolerance=config.stop_tolerance, monitor=monitor, guard=guard)
    optimizer = optim.gradient_descent(config.lr)
    if config.procedure == "misclassified":
        procedure = procedures.misclassified(model, objective, optimizer, x_train, y_train,
                                             batch_size=config.batch_size, **common)
    else:
        procedure = procedures.cost_checked(model, objective, optimizer, x_train, y_train,
                                            perturbation_scale=config.perturbation, **common)
    return model, objective, procedure


def initial_states(model, procedure, config, features):
    """One TrainState per restart (leading axis): params from init_key, run from train_key."""

    def one(key):
        init_key, train_key = jax.random.split(key)
        return procedure.init(model.init(init_key, (-1, features))[1], train_key)

    return jax.jit(jax.vmap(one))(jax.random.split(jax.random.key(config.seed), config.restarts))


def advance_each_restart(procedure):
    """advance(state, start, length) over the restart axis; records (length, restarts).

    The restarts run one after another (`lax.map`), not side by side (`vmap`): under vmap the
    cost check's `lax.cond` becomes a select that evaluates the perturbation branch's forward
    and backward pass at every step, which doubled the time of a step here.
    """

    def advance(state, start, length):
        state, records = jax.lax.map(
            lambda s: procedures.run_steps(procedure, s, start, length), state)
        return state, jax.tree.map(lambda r: jnp.swapaxes(r, 0, 1), records)

    return advance


def main(argv=None):
    config, args = parse(Config, argv, __doc__, prog=f"python -m experiments.{EXPERIMENT}")
    check_applicable(config, ONLY_WITH)
    splits = load_splits(config.seed)
    (x_train, y_train), (x_held, y_held), (x_test, y_test) = splits
    model, objective, procedure = build(config, splits)  # its checks before config.json
    run = open_run(EXPERIMENT, config, args)
    features = x_train.shape[1]

    init_params = model.init(jax.random.key(config.seed), (-1, features))[1]
    report = []
    for dtype in (jnp.float64, jnp.float32) if config.gradient_report else ():
        report += gradient_report(
            model, objective, init_params, x_train[:100], y_train[:100], dtype, "lecture_mlp")

    outcome = train(
        run, advance_each_restart(procedure), initial_states(model, procedure, config, features),
        total_steps=config.steps, checkpoint_every=config.checkpoint_every,
        keep=config.keep_checkpoints, progress_every=config.progress_every,
        leaf_names=[f"{layer}.{param}" for layer, param, _ in
                    named_parameters(model, init_params)])
    final = outcome.state
    held_out_errors = jax.jit(jax.vmap(
        lambda p: metrics.classification_error(model, p, x_held, y_held)))(final.params)
    best_index = int(jnp.argmin(held_out_errors))
    best_params = jax.tree.map(lambda leaf: leaf[best_index], final.params)
    stop_steps = procedures.stop_step(final.stop, outcome.steps_done)
    stop = int(stop_steps[best_index])
    accuracy_of = jax.jit(functools.partial(metrics.accuracy, model))
    accuracy = {name: float(accuracy_of(best_params, x, y)) for name, (x, y) in
                (("train", (x_train, y_train)), ("held_out", (x_held, y_held)),
                 ("test", (x_test, y_test)))}
    restarts = [
        {"restart": i, "held_out_error": float(held_out_errors[i]),
         "final_energy": float(final.energy[i]), "stop_step": int(stop_steps[i]),
         "perturbations": int(final.perturbations[i]),
         "rejected_non_finite": int(final.guard.rejected[i])}
        for i in range(config.restarts)
    ]
    recorded = [name.split("/")[0] for name in outcome.history[0] if name.endswith("/0")]
    history = [{"step": r["step"], **{name: r[f"{name}/{best_index}"] for name in recorded}}
               for r in outcome.history if r["step"] <= stop]
    metrics_out = {
        "train_accuracy": accuracy["train"], "held_out_accuracy": accuracy["held_out"],
        "test_accuracy": accuracy["test"], "best_restart": best_index,
        "final_energy": float(final.energy[best_index]), "stop_step": stop,
        "perturbations": int(final.perturbations[best_index]),
        "gradient_report_passed": all(row["passed"] for row in report) if report else None,
        "architecture": {"inputs": features, "hidden_layers": config.hidden_layers,
                         "hidden_units": nets.mlp.step0_hidden_units(features,
                                                                     config.hidden_factor),
                         "outputs": 10},
    }
    results.write_results(
        run.workdir, EXPERIMENT, dataclasses.asdict(config), metrics_out, history,
        outcome.seconds, gradient_report=report, restarts=restarts,
        resumed_from_step=outcome.resumed_from)
    plot_curves(run.workdir, outcome.history, history, config.restarts, best_index)
    results.save_and_print_table(
        run.workdir, render(report, restarts, metrics_out, outcome.seconds, run.workdir))
    return metrics_out


def plot_curves(workdir, all_history, kept_history, restarts, best_index):
    steps = np.array([r["step"] for r in all_history])
    kept_steps = np.array([r["step"] for r in kept_history])

    def kept(name):
        return np.array([r[name] for r in kept_history])

    plots.save_curves(workdir / "curves.png", [
        {"ylabel": "E(w) on the training split", "log": True,
         "series": {f"restart {i}" + (" (kept)" if i == best_index else ""):
                    (steps, np.array([r[f"energy/{i}"] for r in all_history]))
                    for i in range(restarts)}},
        {"ylabel": "E(w), kept restart", "log": True,
         "series": {"train": (kept_steps, kept("energy")),
                    "held-out": (kept_steps, kept("held_out_energy"))}},
        {"ylabel": "classification error, kept restart",
         "series": {"train": (kept_steps, kept("train_error")),
                    "held-out": (kept_steps, kept("held_out_error"))}},
    ], title="The lecture's cost-checked gradient descent on the 8x8 digits")


def render(report, restarts, metrics_out, seconds, workdir):
    columns = ["layer", "param", "dtype", "rel_err_vs_autodiff", "rel_err_vs_finite_diff",
               "cosine", "by_hand", "passed"]
    return "\n".join([
        "## Gradient report at initialisation (manual vs jax.grad, and vs finite differences; "
        "by_hand: no equation of JAX's differentiation in the manual pass's program)",
        results.markdown_table(report, columns),
        "## Random restarts (cost-checked full-batch gradient descent)",
        results.markdown_table(restarts),
        "## Kept restart",
        results.markdown_table([{
            "train acc": metrics_out["train_accuracy"],
            "held-out acc": metrics_out["held_out_accuracy"],
            "test acc": metrics_out["test_accuracy"], "steps": metrics_out["stop_step"],
            "perturbations": metrics_out["perturbations"],
            "compile s": seconds["compile"], "run s": seconds["run"]}]),
        f"Results in {workdir}",
    ])


if __name__ == "__main__":
    run_main(main, EXPERIMENT)
