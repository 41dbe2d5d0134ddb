"""K-FAC against SGD and Adam on the zip-code digits, by epochs and by seconds.

    python -m experiments.kfac [--workdir DIR] [--model lenet1989|mlp|lenet5] [--epochs 10]
        [--batch-size 256] [--optimizers sgd,adam,kfac,kfac_adaptive]
        [--sgd-lr 0.003,0.01,0.03] [--adam-lr 0.003,0.01,0.03] [--kfac-lr 0.003,0.01,0.03]
        [--damping 0.03] [--adaptive-damping 1] [--refresh-every 1] [--exact] [--seed 0]

Martens and Grosse's (2015) Kronecker-factored approximate curvature with every factor from
the hand-written passes (`nets.kronecker.kronecker_factors`: the layers' inputs, or patches,
and the loss's curvature sent back through the backward passes) and the step of
`training.optim.kfac` (each leaf's gradient under its damped block A (x) G, then SGD with
momentum 0.9). The net is the 1989 recipe's (LeNet-1989, tanh, squared error against +-1
targets, U(+-2.4/sqrt(F)) weights) or a 256-100-10 tanh MLP on the zip-code digits, or
LeNet-5 (its scaled tanh, a Dense output under softmax cross-entropy) on MNIST's test images
(the first 8,000 for training, the last 2,000 for testing, as `experiments.lenet5` without
the full files), where the trainable subsampling layers S2 and S4 have no Kronecker form
and get the exact diagonal of their Gauss-Newton blocks (`nets.kronecker.DiagonalBlock`;
the optimisers are given the model). It is trained in mini-batches of
`--batch-size` from the same initial weights and the same shuffled batches for every
optimiser: SGD with momentum 0.9 and Adam at each step size of their grids, K-FAC at each of
its own with the blocks re-estimated every `--refresh-every` steps from that step's batch
(one sampled curvature column per digit; `--exact` backpropagates all ten), and
`kfac_adaptive`, Martens and Grosse's own step (`optim.kfac_adaptive`: blocks every step,
the direction rescaled with momentum by the quadratic model's two G v products, lambda by
the Levenberg-Marquardt rule from each of `--adaptive-damping`, which its rows list as
their "step size"). After every epoch: the loss on all 7,291 training digits and the error
on the 2,007 test digits. Each optimiser's best step size is the one with the lowest final
training loss.

Before and after: on the first `--quality-examples` training digits, each leaf's Kronecker
block (all ten columns) against its exact Gauss-Newton block from jax (`block_quality`), at
the initial weights and at K-FAC's best run's final ones.

Writes results.json (metrics: each optimiser's best final training loss, test error and
seconds; "runs": every run's per-epoch history; "block_quality": the blocks' errors),
results.md (every run, every leaf's errors) and kfac.png
(training loss against epoch and against seconds, each optimiser at its best step size).
The seconds are the runs' own, compilation apart (`seconds`: each run's compile time).

Measured on the 2-core CPU (jax 0.10.2, 2026-12-06), defaults (seed 0; 80 s): the best final
training loss K-FAC 0.0301 at 0.01 (test error 6.18%, 124 misses), Adam 0.0997 at 0.01
(7.67%, 154), SGD 0.2212 at 0.01 (10.01%, 201); K-FAC passes Adam's final loss after 5
epochs. A K-FAC step took 48.8 ms against Adam's 4.3 (13.7 s against 1.2 s for the ten
epochs; 41.0 against 4.3 in a later run), so by the clock Adam leads on this net.
`--refresh-every 10`: 13.3 ms a step, loss 0.0703; `--exact`: 0.0280 at 226 ms a step.
kfac_adaptive from lambda = 1 (a later run, the others unchanged): loss 0.0155, test error
5.23% (105 misses), 63.6 ms a step; after one epoch 0.298, after three 0.0916. The
blocks on the first 64 digits (relative Frobenius error of A (x) G, and of the exact block's
diagonal): the biases' 1e-7 (exact but for float32 rounding) against 0.81-0.98 (the output
bias's block is diagonal: 0); the Dense weights' 0.139 (H3) and 0.144 (output) against 0.998
and 0.939 at the initial weights, 0.563 and 0.565 after K-FAC's run; the convolutions' 0.774
(H1) and 0.888 (H2) against 0.955 and 0.996 (0.828, 0.919 after): KFC's assumption of
spatially uncorrelated output gradients holds poorly on 8x8 and 4x4 maps with unshared
biases.

`--model lenet5` (2026-12-06, seed 0, 7 min 42 s): best final training loss K-FAC 0.0010 at
0.01 (test error 1.95%, 39 of 2,000 missed), Adam 0.0032 at 0.01 (2.80%), SGD 0.0223 at 0.03
(2.25%); kfac_adaptive 0.0022 (1.45%, 29 missed). A step: K-FAC 74.1 ms, kfac_adaptive
129.4, Adam 15.1, SGD 15.4.
"""
from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import nets
from experiments.lenet5 import to_lenet5_input
from nets import models
from nets.engines import gauss_newton_product
from nets.kronecker import DiagonalBlock, kronecker_factors
from training import data, optim, plots, results
from training.config import ConfigError, option, parse, run_main
from training.harness import open_run
from training.logbook import Progress

EXPERIMENT = "kfac"
MODELS = ("lenet1989", "mlp", "lenet5")
OPTIMIZERS = ("sgd", "adam", "kfac", "kfac_adaptive")
MOMENTUM = 0.9
QUALITY_MAX_PARAMETERS = 6000  # a leaf's exact block is its size squared (6000: 144 MB)


@dataclasses.dataclass(frozen=True)
class Config:
    model: str = option("lenet1989", "the net: LeNet-1989 or a 256-100-10 tanh MLP on USPS, "
                        "or LeNet-5 on MNIST's test images", choices=MODELS)
    optimizers: tuple[str, ...] = option(OPTIMIZERS, "comma-separated optimisers to run",
                                         choices=OPTIMIZERS)
    epochs: int = option(10, "passes over the training digits", ge=1)
    batch_size: int = option(256, "digits per step (the last partial batch is dropped)", ge=1)
    sgd_lr: tuple[float, ...] = option((0.003, 0.01, 0.03), "SGD's step sizes (momentum 0.9)",
                                       gt=0)
    adam_lr: tuple[float, ...] = option((0.003, 0.01, 0.03), "Adam's step sizes", gt=0)
    kfac_lr: tuple[float, ...] = option((0.003, 0.01, 0.03), "K-FAC's step sizes (momentum "
                                        "0.9)", gt=0)
    damping: float = option(0.03, "K-FAC's Tikhonov damping gamma", gt=0)
    adaptive_damping: tuple[float, ...] = option((1.0,), "kfac_adaptive's initial lambdas "
                                                 "(its grid, in place of step sizes)", gt=0)
    decay: float = option(0.95, "K-FAC's running average of the blocks: weight on the past",
                          ge=0, lt=1)
    refresh_every: int = option(1, "re-estimate K-FAC's blocks every this many steps", ge=1)
    exact: bool = option(False, "K-FAC's G from all ten curvature columns, not one sample")
    train_examples: int = option(0, "first training digits (0: all 7,291 of USPS, 8,000 of "
                                 "MNIST)", ge=0)
    test_examples: int = option(0, "first test digits (0: all 2,007 of USPS, 2,000 of MNIST)",
                                ge=0)
    seed: int = option(0, "seed of the initial weights, the batches and K-FAC's samples", ge=0)
    quality_examples: int = option(64, "training digits on which each leaf's Kronecker block "
                                       "is set beside its exact Gauss-Newton block (0: none)",
                                   ge=0)


# (training, test) examples of each model's data: USPS's, or MNIST's test images cut in two
SIZES = {"lenet1989": (7291, 2007), "mlp": (7291, 2007), "lenet5": (8000, 2000)}


def check_sizes(config: Config) -> None:
    """--train-examples and --test-examples within the data (a ConfigError before the run)."""
    for option_name, asked, available in zip(("train", "test"), (
            config.train_examples, config.test_examples), SIZES[config.model]):
        if asked > available:
            raise ConfigError(f"option --{option_name}-examples: got {asked}; allowed: at "
                              f"most {available} with --model {config.model}")


def _mnist_splits(config: Config):
    """LeNet-5's ((x, one-hot targets, labels) train, (...) test) from MNIST's test images."""
    images, labels = data.load_mnist("test")
    train, _ = SIZES["lenet5"]
    splits = []
    for rows, limit in ((slice(0, train), config.train_examples),
                        (slice(train, None), config.test_examples)):
        x, y = images[rows], labels[rows]
        x, y = (x[:limit], y[:limit]) if limit else (x, y)
        splits.append((to_lenet5_input(x), jnp.asarray(data.one_hot(y, 10)), jnp.asarray(y)))
    return splits


def build(config: Config):
    """(model, objective, ((x, targets, labels) train, (...) test)); targets +-1 (USPS) or
    one-hot (MNIST)."""
    if config.model == "lenet5":
        return (models.lenet5(), nets.Objective(nets.softmax_cross_entropy(), 0.0),
                _mnist_splits(config))
    splits = []
    for images, labels in data.load_usps_splits(config.train_examples, config.test_examples):
        x = images.reshape(-1, 16, 16, 1) if config.model == "lenet1989" else images
        splits.append((jnp.asarray(x), jnp.asarray(2 * data.one_hot(labels, 10) - 1),
                       jnp.asarray(labels)))
    if config.model == "lenet1989":
        model = models.lenet1989()
    else:
        model = nets.build_mlp(256, 10, hidden_units=100, activation="tanh",
                               output_activation="tanh")
    return model, nets.Objective(nets.mean_squared_error(), 0.0), splits


def optimizer(name: str, learning_rate: float, config: Config, model
              ) -> optax.GradientTransformation:
    if name == "sgd":
        return optax.sgd(learning_rate, MOMENTUM)
    if name == "adam":
        return optax.adam(learning_rate)
    if name == "kfac_adaptive":
        return optim.kfac_adaptive(learning_rate, config.decay, model=model)
    return optim.kfac(learning_rate, config.damping, config.decay, MOMENTUM, model=model)


def step_functions(model, objective, name: str, transform, config: Config):
    """Jitted `step(params, state, x, targets, step_key) -> (params, state, loss)`, and for
    K-FAC a second one that re-estimates the blocks from the batch first (kfac_adaptive's
    every step, with the batch's G v and E)."""
    value_and_grad = nets.manual(model, objective)
    blocks_of = kronecker_factors(model, objective)
    product = gauss_newton_product(model, objective)

    def step(params, state, x, targets, step_key, refresh):
        loss, grads = value_and_grad(params, x, targets)
        extra = {}
        if refresh:
            extra["blocks"] = blocks_of(params, x, targets,
                                        sample_key=None if config.exact else step_key)
        if name == "kfac_adaptive":
            extra["gauss_newton"] = lambda v: product(params, x, targets, v)
            extra["batch_energy"] = lambda at: objective.value(at, model.apply(at, x), targets)
        updates, state = transform.update(grads, state, params, **extra)
        return optax.apply_updates(params, updates), state, loss

    refreshing = jax.jit(lambda *args: step(*args, refresh=True)) if "kfac" in name else None
    plain = refreshing if name == "kfac_adaptive" else jax.jit(
        lambda *args: step(*args, refresh=False))
    return plain, refreshing


@functools.partial(jax.jit, static_argnums=(0, 1))
def _losses_and_misses(model, objective, params, train, test):
    x, targets, _ = train
    test_x, _, test_labels = test
    predicted = jnp.argmax(model.apply(params, test_x), axis=1)
    wrong = predicted.astype(test_labels.dtype) != test_labels
    return objective.value(params, model.apply(params, x), targets), jnp.sum(wrong)


def evaluate(model, objective, params, train, test) -> dict:
    """The training loss and the test error and misses, compiled once per model."""
    train_loss, misses = _losses_and_misses(model, objective, params, train, test)
    return {"train_loss": float(train_loss), "test_error": int(misses) / test[0].shape[0],
            "test_misses": int(misses)}


def train_one(model, objective, params, splits, name: str, learning_rate: float,
              config: Config) -> dict:
    """One optimiser at one step size: (the trained params, a record of the per-epoch
    history, the seconds of its steps (compilation apart) and its compile time)."""
    train, test = splits
    transform = optimizer(name, learning_rate, config, model)
    state = transform.init(params)
    plain, refreshing = step_functions(model, objective, name, transform, config)
    examples = train[0].shape[0]
    batches = examples // config.batch_size
    if batches == 0:
        raise ValueError(f"kfac: --batch-size {config.batch_size} exceeds the "
                         f"{examples} training digits")
    sample_keys = jax.random.split(jax.random.key(config.seed + 1), config.epochs * batches)
    host_x, host_targets = np.asarray(train[0]), np.asarray(train[1])  # batches cut on the host
    first_batch = host_x[:config.batch_size], host_targets[:config.batch_size]
    began = time.perf_counter()
    distinct = [plain] + ([refreshing] if refreshing not in (None, plain) else [])
    compiled = [function.lower(params, state, *first_batch, sample_keys[0]).compile()
                for function in distinct]
    compile_seconds = time.perf_counter() - began
    plain, refreshing = compiled[0], compiled[-1]
    for function in compiled:  # warm-up, discarded
        jax.block_until_ready(function(params, state, *first_batch, sample_keys[0]))
    history = [{"epoch": 0, "seconds": 0.0, **evaluate(model, objective, params, train, test)}]
    seconds, step = 0.0, 0
    progress = Progress(config.epochs * batches, every=batches,
                        description=f"{name} {learning_rate:g}")
    for epoch in range(1, config.epochs + 1):
        order = np.random.default_rng([config.seed, epoch]).permutation(examples)
        began = time.perf_counter()
        for batch in range(batches):
            rows = order[batch * config.batch_size:(batch + 1) * config.batch_size]
            refresh = name == "kfac_adaptive" or (name == "kfac"
                                                   and step % config.refresh_every == 0)
            params, state, loss = (refreshing if refresh else plain)(
                params, state, host_x[rows], host_targets[rows], sample_keys[step])
            step += 1
        jax.block_until_ready(params)
        seconds += time.perf_counter() - began
        progress.update(step, float(loss))
        history.append({"epoch": epoch, "seconds": seconds,
                        **evaluate(model, objective, params, train, test)})
    progress.close()
    last = history[-1]
    return params, {"optimizer": name, "learning_rate": learning_rate, "history": history,
            "final_train_loss": last["train_loss"], "final_test_error": last["test_error"],
            "final_test_misses": last["test_misses"], "seconds": seconds,
            "seconds_per_step": seconds / step, "compile_seconds": compile_seconds,
            "diverged": not np.isfinite(last["train_loss"])}


def _with_leaf(params, index: int, key: str, value):
    chain = list(params)
    chain[index] = {**chain[index], key: value}
    return tuple(chain)


@functools.partial(jax.jit, static_argnums=(0, 4, 5))
def _exact_block(model, params, x, hessian, index: int, key: str) -> jax.Array:
    """J^T H J of one leaf, J by `jax.jacobian` of the outputs in it (compiled: run op by op
    it took most of a small LeNet-5 run's time)."""
    leaf = params[index][key]
    jacobian = jax.jacobian(lambda flat: model.apply(
        _with_leaf(params, index, key, flat.reshape(leaf.shape)), x).reshape(-1))(
        leaf.reshape(-1))
    return jacobian.T @ hessian @ jacobian


def block_quality(model, objective, params, x, targets) -> list[dict]:
    """For each leaf, its exact Gauss-Newton block B = J^T H J on (x, targets) (J by
    `jax.jacobian` of the outputs in the leaf, H by `jax.hessian` of E in the outputs) beside
    K-FAC's exact-column A (x) G (`kronecker_factors`; a `DiagonalBlock` as its diagonal
    matrix): the relative Frobenius error of A (x) G, and for comparison that of B's own
    diagonal (what a diagonal method such as LeCun's
    keeps at best), over the leaf's parameters (a connection table's zeros left out). A leaf
    of more than QUALITY_MAX_PARAMETERS is listed with its size and no errors."""
    blocks = jax.jit(kronecker_factors(model, objective))(params, x, targets)
    outputs = jax.jit(model.apply)(params, x)
    hessian = jax.jit(jax.hessian(lambda flat: objective.loss.value(
        flat.reshape(outputs.shape), targets)))(outputs.reshape(-1))
    rows = []
    for index, (layer, layer_params) in enumerate(zip(model.sublayers, params)):
        for key in (sorted(layer_params) if isinstance(layer_params, dict) else ()):
            leaf = layer_params[key]
            if leaf.size > QUALITY_MAX_PARAMETERS:
                rows.append({"layer": layer.name, "leaf": key, "parameters": int(leaf.size),
                             "kfac_relative_error": None, "diagonal_relative_error": None})
                continue
            exact = np.asarray(_exact_block(model, params, x, hessian, index, key), np.float64)
            block = blocks[index][key]
            if isinstance(block, DiagonalBlock):  # a layer without factors: its diagonal
                kept = np.ones(leaf.size, bool)
                approximation = np.diag(np.asarray(block.diagonal, np.float64).reshape(-1))
            else:
                kept = np.asarray(block.mask).reshape(-1) > 0
                approximation = np.kron(np.asarray(block.a, np.float64),
                                        np.asarray(block.g, np.float64))[np.ix_(kept, kept)]
            exact = exact[np.ix_(kept, kept)]
            norm = np.linalg.norm(exact)
            rows.append({"layer": layer.name, "leaf": key, "parameters": int(kept.sum()),
                         "kfac_relative_error": float(np.linalg.norm(approximation - exact)
                                                      / norm),
                         "diagonal_relative_error": float(np.linalg.norm(
                             exact - np.diag(np.diag(exact))) / norm)})
    return rows


def best_runs(runs: list[dict]) -> dict[str, dict]:
    """Each optimiser's run with the lowest final training loss (a diverged one last)."""
    best = {}
    for run in runs:
        loss = run["final_train_loss"] if np.isfinite(run["final_train_loss"]) else np.inf
        kept = best.get(run["optimizer"])
        if kept is None or loss < kept["final_train_loss"]:
            best[run["optimizer"]] = {**run, "final_train_loss": loss}
    return best


def plot(path, best: dict[str, dict]) -> None:
    def series(x_key):
        return {f"{name} ({run['learning_rate']:g})": (
            [row[x_key] for row in run["history"]],
            [row["train_loss"] for row in run["history"]]) for name, run in best.items()}

    plots.save_curves(path, [
        {"xlabel": "epoch", "ylabel": "training loss", "log": True, "series": series("epoch")},
        {"xlabel": "seconds (compilation apart)", "ylabel": "training loss", "log": True,
         "series": series("seconds")},
        {"xlabel": "epoch", "ylabel": "test error", "series": {
            f"{name} ({run['learning_rate']:g})": (
                [row["epoch"] for row in run["history"]],
                [row["test_error"] for row in run["history"]]) for name, run in best.items()}},
    ], title="K-FAC, SGD and Adam")


def main(argv=None):
    config, args = parse(Config, argv, __doc__, prog=f"python -m experiments.{EXPERIMENT}")
    check_sizes(config)
    run = open_run(EXPERIMENT, config, args)
    model, objective, splits = build(config)
    params = jax.jit(lambda key: model.init(key, (-1, *splits[0][0].shape[1:]))[1])(
        jax.random.key(config.seed))  # one program, not each draw apart
    grids = {"sgd": config.sgd_lr, "adam": config.adam_lr, "kfac": config.kfac_lr,
             "kfac_adaptive": config.adaptive_damping}
    trained = [train_one(model, objective, params, splits, name, learning_rate, config)
               for name in config.optimizers for learning_rate in grids[name]]
    runs = [record for _, record in trained]
    best = best_runs(runs)
    quality = {}
    if config.quality_examples:
        x, targets, _ = splits[0]
        sample = x[:config.quality_examples], targets[:config.quality_examples]
        quality["initial"] = block_quality(model, objective, params, *sample)
        if "kfac" in best:
            kfac_params = next(trained_params for trained_params, record in trained
                               if record["optimizer"] == "kfac" and record["learning_rate"]
                               == best["kfac"]["learning_rate"])
            quality["after_kfac"] = block_quality(model, objective, kfac_params, *sample)
    metrics = {f"{name}_{key}": best[name][field] for name in best for key, field in (
        ("learning_rate", "learning_rate"), ("train_loss", "final_train_loss"),
        ("test_error", "final_test_error"), ("test_misses", "final_test_misses"),
        ("seconds", "seconds"), ("seconds_per_step", "seconds_per_step"))}
    seconds = {f"{run['optimizer']}_{run['learning_rate']:g}_compile": run["compile_seconds"]
               for run in runs}
    results.write_results(run.workdir, EXPERIMENT, dataclasses.asdict(config), metrics, [],
                          seconds, runs=runs, block_quality=quality)
    plot(run.workdir / "kfac.png", best)
    rows = [{"optimizer": r["optimizer"], "step size": r["learning_rate"],
             "train loss": r["final_train_loss"], "test error": r["final_test_error"],
             "test misses": r["final_test_misses"], "seconds": r["seconds"],
             "ms a step": 1000 * r["seconds_per_step"], "compile s": r["compile_seconds"],
             "best": best[r["optimizer"]]["learning_rate"] == r["learning_rate"]} for r in runs]
    quality_rows = [{"weights": when, **row} for when, when_rows in quality.items()
                    for row in when_rows]
    results.save_and_print_table(run.workdir, results.markdown_table(rows) + (
        "\n" + results.markdown_table(quality_rows) if quality_rows else "")
        + f"\nResults in {run.workdir}\n")
    return metrics


if __name__ == "__main__":
    run_main(main, EXPERIMENT)
