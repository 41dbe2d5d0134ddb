"""A deep sigmoid net trained by Hessian-free optimisation, SGD, Adam and K-FAC (Martens 2010).

    python -m experiments.hessian_free [--workdir DIR] [--hidden-layers 8] [--width 64]
        [--methods hessian_free,sgd,adam,kfac] [--hf-steps 200] [--passes 400]
        [--kfac-passes 20] [--seeds 1]

The lecture's deep-net lesson (`experiments.depth`: eight sigmoid layers did not train in
2,000 Adam updates) with the optimiser Martens (2010) proposed for it: Newton-like steps
(G + lambda I) d = -g solved by conjugate gradients, every product G v one tangent and one
backward pass by hand (`training.procedures.hessian_free`, `nets.engines.
gauss_newton_product`), preconditioned by LeCun's backpropagated diagonal. The net: 256 -
64 x 8 sigmoid - 10, the lecture's objective (sigmoid cross-entropy), weights
U(+-2.4/sqrt(F)); the first --examples USPS training digits, tested on the 2,007 test
digits. Three ways from the same initial weights:

  hessian_free  --hf-steps full-batch steps of --cg-iterations conjugate gradients, G (and
                the preconditioner's diagonal) on the first --curvature-examples digits,
                Levenberg-Marquardt damping from --damping;
  hessian_free_exact  the same with the exact Hessian H in G's place (`nets.engines.
                hessian_product`, Pearlmutter's R-operator by hand), conjugate gradients
                stopping at the first direction of non-positive curvature (Martens 2010,
                section 4.2, found G the better choice);
  saddle_free   the saddle-free Newton step (Dauphin et al. 2014): --cg-iterations Lanczos
                iterations on H from g span a Krylov subspace, in which the step is
                -(|H| + lambda I)^-1 g, H's negative curvature descended (no preconditioner);
  sgd           --passes shuffled passes of mini-batches of --batch-size, step --sgd-lr;
  adam          the same passes with Adam (--adam-lr);
  kfac          --kfac-passes shuffled passes of mini-batches of --kfac-batch-size with
                Martens and Grosse's K-FAC (`procedures.kfac_passes`: Kronecker-factored
                blocks from the hand-written passes, one sampled curvature column a digit,
                the step rescaled by the quadratic model with two G v products, lambda
                from --kfac-damping by the Levenberg-Marquardt rule).

Each run goes in --records chunks, timed apart from their compilation; the loss, train and
test error are measured between chunks (not timed). Writes results.json (metrics per method:
mean over seeds of the final loss, train and test error, and the seconds; history: per
record, method and seed), results.md and hessian_free.png (loss against seconds and against
steps or passes; train and test error against seconds).

Measured on the 2-core CPU (jax 0.10.2, 2026-12-06), defaults, seeds 0-2 (--seeds 3; 227 s
of training): all three start on the plateau of loss 3.21 (every output at its mean).
Hessian-free leaves it within 20-40 steps (5-9 s) at every seed; SGD after 240-320 passes at
seeds 1 and 2 and not in 400 at seed 0; Adam in its first 40 passes. Means at the end:

    method         loss    train error   test error   seconds
    hessian_free   0.578   2.7%          22.9%        46
    sgd            1.150   28.3%         34.9%        14
    adam           0.012   0.16%         8.6%         16

Hessian-free fits the training digits and generalises far worse than Adam; with one hidden
layer (--hidden-layers 1, 100 steps and passes) the three end within 6.5-7.0% test error.

With the exact Hessian in G's place (hessian_free_exact; 2026-12-06, seeds 0-2, 80-83 s a
seed, 1.9 times G's 42 s): every seed reaches the plateau in its first 20 steps and two
never leave it. On the plateau the steps of (H + lambda I) d = -g raise E or leave it
unchanged in float32, every one is refused, and lambda grows 1.5x a step, its mean over
the last 20 steps 1.3e32 and 3.8e31 (seeds 0 and 1: loss 3.2141, train error 83.7%, after
200 steps); at seed 2 lambda stays near 0.07 and the net leaves the plateau after 180 steps
(loss 2.50 at 200). In the first 20 steps conjugate gradients stopped at a direction of
non-positive curvature after 34-39 of their 50 iterations on average (G's ran 49-50).
Means: loss 2.977, train error 77.2%, test error 76.1%, against G's
0.578, 2.7% and 22.9% from the same weights: Martens' (2010, section 4.2) preference for G
over H, reproduced.

The saddle-free Newton step (saddle_free; a later session the same day, seeds 0-2, one run
with hessian_free beside it: G's numbers seed for seed as above, 55 s a seed on that host):
it too reaches the plateau in 20 steps, leaves it by step 40-60 (loss 0.28-0.76 at step 60,
test error 11.0-15.7%), and ends at loss 0.0044, train error 0.005% (0-1 of the 7,200
digits) and test error **8.6%** (8.52, 8.62, 8.62%), 84 s a seed: as low as Adam's 8.6% and
far below G's 22.9%, where the Newton step with H stays on the plateau. Every step used all
50 Lanczos iterations; 50-100% of each chunk's steps were accepted, lambda 6e-4 to 0.37.
G without its preconditioner (--preconditioner none, the same seeds): loss 0.567, train
error 2.5%, test error 22.6%, so the preconditioner is not what separates them.

K-FAC (kfac; 2026-12-06, seeds 0-2 in one run with hessian_free, sgd and adam, whose
numbers matched the above to the third decimal): on the plateau for 4 passes, off it by
pass 6-8, and after its 20 passes loss 0.078, train error 0.39%, test error 8.55% (8.92,
8.02, 8.72%) in 7.1 s a seed, where Hessian-free took 54.6 s to 22.9% and Adam 17.2 s to
8.57% that run (at about 7 s Adam's loss was lower, 0.032-0.059, and its test error
higher, 9.0-10.1%). 80 passes (seed 0) stall at loss 0.06-0.10 from pass 20 on while the
test error rises to 12.1%: batches of 256 are too noisy there (Martens and Grosse grow the
batch).
"""
from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import nets
from nets.losses import is_weight
from training import data, plots, procedures, results
from training.config import ConfigError, option, parse, run_main
from training.harness import open_run
from training.metrics import classification_error

EXPERIMENT = "hessian_free"
METHODS = ("hessian_free", "hessian_free_exact", "saddle_free", "sgd", "adam", "kfac")
CURVATURE_OF = {"hessian_free": "gauss_newton", "hessian_free_exact": "hessian",
                "saddle_free": "saddle_free"}


@dataclasses.dataclass(frozen=True)
class Config:
    hidden_layers: int = option(8, "sigmoid hidden layers", ge=1)
    width: int = option(64, "units per hidden layer", ge=1)
    examples: int = option(7200, "first USPS training digits to train on", ge=1, le=7291)
    methods: tuple[str, ...] = option(METHODS, "comma-separated methods", choices=METHODS)
    hf_steps: int = option(200, "Hessian-free steps", ge=1)
    cg_iterations: int = option(50, "conjugate-gradient iterations per step", ge=1)
    curvature_examples: int = option(1800, "first digits that give G", ge=1)
    damping: float = option(1.0, "initial Levenberg-Marquardt lambda", gt=0)
    preconditioner: str = option("diagonal", "conjugate gradients' preconditioner (not "
                                 "saddle_free's)",
                                 choices=procedures.PRECONDITIONERS)
    passes: int = option(400, "passes of SGD and of Adam", ge=1)
    batch_size: int = option(64, "SGD's and Adam's mini-batch", ge=1)
    sgd_lr: float = option(0.1, "SGD's step", gt=0)
    adam_lr: float = option(1e-3, "Adam's step", gt=0)
    kfac_passes: int = option(20, "passes of K-FAC", ge=1)
    kfac_batch_size: int = option(256, "K-FAC's mini-batch", ge=1)
    kfac_damping: float = option(1.0, "K-FAC's initial lambda", gt=0)
    kfac_relative: bool = option(False, "K-FAC's blocks damped relative to their scale")
    records: int = option(10, "chunks each run is timed and measured in", ge=1)
    seeds: int = option(1, "seeds 0 .. seeds - 1: initial weights and orders", ge=1)
    l2: float = option(0.0, "lambda of the lecture's L2 penalty lambda/(2m) |w|^2", ge=0)


def load(config):
    """(train x (n, 256), train targets (n, 10) one-hot, test x, test targets)."""
    images, labels = data.load_usps("train")
    test_images, test_labels = data.load_usps("test")
    one_hot = [jnp.asarray(data.one_hot(labels[:config.examples], 10)),
               jnp.asarray(data.one_hot(test_labels, 10))]
    return (jnp.asarray(images[:config.examples]), one_hot[0], jnp.asarray(test_images),
            one_hot[1])


def weights(params) -> list[jax.Array]:
    """The "w" leaves (the L2 penalty's)."""
    return [leaf for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
            if is_weight(path)]


def build(config):
    model = nets.build_mlp(256, 10, hidden_layers=config.hidden_layers,
                           hidden_units=config.width, activation="sigmoid")
    return model, nets.lecture_objective(config.l2)


def procedure_of(method, config, model, objective, x, targets):
    """(procedure, steps): one step a Hessian-free step (with G, with the exact H for
    "hessian_free_exact", saddle-free Newton's with |H| for "saddle_free"), or a pass of
    mini-batches."""
    if method in CURVATURE_OF:
        curvature = CURVATURE_OF[method]
        return procedures.hessian_free(
            model, objective, x, targets, cg_iterations=config.cg_iterations,
            damping=config.damping, curvature_examples=config.curvature_examples,
            preconditioner="none" if curvature == "saddle_free" else config.preconditioner,
            stop_tolerance=None, curvature=curvature), config.hf_steps
    if method == "kfac":
        return procedures.kfac_passes(
            model, objective, x, targets, batch_size=config.kfac_batch_size,
            initial_damping=config.kfac_damping, relative=config.kfac_relative), config.kfac_passes
    optimizer = optax.sgd(config.sgd_lr) if method == "sgd" else optax.adam(config.adam_lr)
    return procedures.stochastic_passes(model, objective, optimizer, x, targets,
                                        batch_size=config.batch_size,
                                        shuffle=True), config.passes


def chunk_lengths(steps: int, records: int) -> list[int]:
    """`steps` split into at most `records` chunks as equal as can be (larger first)."""
    records = min(records, steps)
    return [steps // records + (i < steps % records) for i in range(records)]


STEP_RECORDS = ("cg_iterations", "accepted", "damping")


def train(procedure, steps, params, key, records, measure):
    """Run in chunks: (compile seconds, [record per chunk]), each record the chunk's end
    step, the seconds run so far (compilation excluded), measure(params) and, for a
    Hessian-free procedure, the chunk's means of its steps' records `STEP_RECORDS` (the
    conjugate-gradient iterations taken, the fraction of steps accepted, lambda)."""
    lengths = chunk_lengths(steps, records)
    chunks = {length: jax.jit(lambda state, start, length=length: procedures.run_steps(
        procedure, state, start, length)) for length in set(lengths)}
    state = jax.jit(procedure.init)(params, key)
    began = time.perf_counter()
    compiled = {length: chunk.lower(state, 0).compile() for length, chunk in chunks.items()}
    compile_s = time.perf_counter() - began
    history, done, run_s = [{"step": 0, "seconds": 0.0, **measure(state.params)}], 0, 0.0
    for length in lengths:
        began = time.perf_counter()
        state, step_records = jax.block_until_ready(compiled[length](state, done))
        run_s += time.perf_counter() - began
        done += length
        history.append({"step": done, "seconds": run_s, **measure(state.params),
                        **{f"mean_{name}": float(jnp.mean(step_records[name]))
                           for name in STEP_RECORDS if name in step_records}})
    return compile_s, history


def main(argv=None):
    config, args = parse(Config, argv, __doc__, prog=f"python -m experiments.{EXPERIMENT}")
    if config.curvature_examples > config.examples:
        raise ConfigError(f"option --curvature-examples: got {config.curvature_examples}; "
                          f"allowed: at most --examples ({config.examples})")
    run = open_run(EXPERIMENT, config, args)
    x, targets, x_test, targets_test = load(config)
    model, objective = build(config)
    energy = jax.jit(lambda p, x, t: objective.value(p, model.apply(p, x), t))
    error = jax.jit(lambda p, x, t: classification_error(model, p, x, t))

    def measure(params):
        return {"loss": float(energy(params, x, targets)),
                "train_error": float(error(params, x, targets)),
                "test_error": float(error(params, x_test, targets_test)),
                "weight_norm": float(jnp.sqrt(sum(jnp.sum(w**2) for w in weights(params))))}

    history, seconds = [], {}
    for method in config.methods:
        procedure, steps = procedure_of(method, config, model, objective, x, targets)
        for seed in range(config.seeds):
            init_key, run_key = jax.random.split(jax.random.key(seed))
            params = model.init(init_key, (-1, 256))[1]
            compile_s, records = train(procedure, steps, params, run_key, config.records,
                                       measure)
            seconds[f"{method}_seed{seed}_compile"] = compile_s
            seconds[f"{method}_seed{seed}_run"] = records[-1]["seconds"]
            history += [{"method": method, "seed": seed, **record} for record in records]
            last = records[-1]
            print(f"{method} seed {seed}: loss {last['loss']:.4f}, train error "
                  f"{last['train_error']:.4f}, test error {last['test_error']:.4f}, "
                  f"{last['seconds']:.1f} s (+ {compile_s:.1f} s compile)", flush=True)

    rows, metrics = [], {}
    for method in config.methods:
        finals = [h for h in history if h["method"] == method and h["step"] == max(
            r["step"] for r in history if r["method"] == method)]
        row = {"method": method,
               **{key: float(np.mean([h[key] for h in finals]))
                  for key in ("loss", "train_error", "test_error", "seconds")}}
        rows.append(row)
        metrics[method] = {key: value for key, value in row.items() if key != "method"}
    results.write_results(run.workdir, EXPERIMENT, dataclasses.asdict(config), metrics,
                          history, seconds)
    save_plot(run.workdir / "hessian_free.png", config, history)
    results.save_and_print_table(
        run.workdir, f"Mean over {config.seeds} seed(s), after {config.hf_steps} Hessian-free "
        f"steps, {config.passes} passes of SGD and Adam or {config.kfac_passes} of K-FAC\n\n"
        + results.markdown_table(rows)
        + f"\nResults in {run.workdir}\n")
    return metrics


def save_plot(path, config, history) -> None:
    def series(x_key, y_key):
        return {f"{method}, seed {seed}": (
            [h[x_key] for h in history if h["method"] == method and h["seed"] == seed],
            [max(h[y_key], 1e-6) for h in history if h["method"] == method
             and h["seed"] == seed])
            for method in config.methods for seed in range(config.seeds)}

    plots.save_curves(path, [
        {"xlabel": "seconds (compilation excluded)", "ylabel": "training loss", "log": True,
         "series": series("seconds", "loss")},
        {"xlabel": "Hessian-free steps or passes", "ylabel": "training loss", "log": True,
         "series": series("step", "loss")},
        {"xlabel": "seconds (compilation excluded)", "ylabel": "train error",
         "series": series("seconds", "train_error")},
        {"xlabel": "seconds (compilation excluded)", "ylabel": "test error",
         "series": series("seconds", "test_error")},
    ], title=f"256-{config.width}x{config.hidden_layers}-10 sigmoid net on USPS")


if __name__ == "__main__":
    run_main(main, EXPERIMENT)
