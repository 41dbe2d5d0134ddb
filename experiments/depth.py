"""Representability against learnability: test error against training-set size, per depth.

    python -m experiments.depth [--workdir DIR] [--depths 1,2,4,8] [--sizes 100,300,900,2400,7200]
        [--width 64] [--activation sigmoid] [--residual] [--batch-norm] [--updates 2000]
        [--seeds 3]

The lecture's trade-off in architecture design: a deeper net can represent more functions with
the same units per layer, but it is harder to learn, from few examples and by gradient descent.
On one fixed task, the USPS digits (256 grey levels in [-1, 1], 10 classes; the 2,007 test
digits held out), MLPs of 1, 2, 4 and 8 hidden layers of --width units (`nets.build_mlp`,
--activation, weights U(+-2.4/sqrt(F))) are trained with the lecture's objective (sigmoid
cross-entropy, lambda = --l2) on random subsets of --sizes training digits (a different subset,
initialisation and order per seed), each for the same --updates mini-batch updates of
--batch-size with Adam (`training.curves.learning_curves`: shuffled passes of
`procedures.stochastic_passes`, errors recorded --records times). No early stopping: the
final error is reported, and the lowest test error along the way beside it (optimistic, since
it is picked on the test set; it shows how much of the gap is overfitting).

All sizes and seeds of one depth run as one vmapped, jitted program (one compilation per depth
instead of one per size): each subset is repeated up to the largest size, which is why every
size must divide the largest (7,200 of the 7,291 digits by default). The loss and errors over
the repeated set are those over the subset; a pass over it is max/size passes over the subset
in one shuffled order, so a mini-batch can hold an example twice.

Writes results.json (the README's keys; metrics: final test and train error, mean and std over
seeds (n - 1 in the denominator, as experiments.seeds), per depth and size, the best depth per
size, and the updates each run made, --updates rounded up to whole passes in --records equal
chunks; history: the errors along training per depth, size and seed), results.md and depth.png
(test error, and train error, against log10 of the training-set size, one curve per depth).

Measured on the 2-core CPU (jax 0.10.2), defaults (64-unit sigmoid layers, --updates 2000 of 64
with Adam 1e-3, which makes 2,260: 20 passes over the 7,200; 3 seeds): 48 s wall on 2026-12-02
(compile 6 s, run 34 s); on the slower host of 2026-12-03 114 s (compile 15 s, run 85 s), and
124 s with `--residual` (compile 17 s, run 90 s). `--residual` turns hidden layers 2, 3, ...
into residual blocks h + sigmoid(h W + b): the same parameters, with identity paths added
(`nets.build_mlp(..., residual=True)`); one hidden layer has no block, so its column is the same
for both. USPS test error, mean of 3 seeds, 2026-12-03 (for eight layers the train error in
brackets):

    size   1 hidden   2 plain  2 resid.   4 plain  4 resid.   8 plain        8 resid.     best
    100    0.220      0.231    0.227      0.254    0.223      0.562 (0.29)   0.224 (0)    1, 1
    300    0.143      0.150    0.147      0.165    0.145      0.584 (0.47)   0.152 (0)    1, 1
    900    0.105      0.108    0.107      0.120    0.107      0.463 (0.38)   0.108 (0)    1, 1
    2,400  0.090      0.088    0.085      0.094    0.085      0.403 (0.33)   0.086 (6e-4) 2, 4
    7,200  0.079      0.077    0.074      0.076    0.071      0.280 (0.22)   0.069 (9e-3) 4, 8

("best": the best depth, plain then residual. Standard deviations over seeds, with n in the
denominator then (n - 1 now, 1.22 times larger for 3 seeds): 0.02-0.03 at 100 examples,
<= 0.005 at 7,200 for 1 to 4 layers; for 8 layers 0.06 to 0.23 plain, 0.002-0.023 residual.
On 2026-12-02 the plain 8-layer column read 0.520, 0.487, 0.458, 0.404 and 0.290: these runs
are that sensitive to rounding.)

What it shows: the trade-off, both halves. Representability: with more layers of the same
width the net fits its training set better (at 7,200 examples the train error falls from 2.7%
with one layer to 0.8% with four), and once the data are plentiful that turns into the lowest
test error (four layers best at 7,200, two at 2,400). Learnability: with few examples the
deeper nets generalise worse (at 100, 300 and 900 examples one layer is best and four layers
the worst of the three), and eight sigmoid layers cannot be learned at all in this budget
(train error 22-47%, test 28-58%, and very different from seed to seed): the vanishing
gradient of experiments.precision, met in training. The best depth grows with the data: 1, 1,
1, 2, 4.

The identity paths carry the gradient past the sigmoids: eight residual layers train (0.9%
train error at 7,200 examples against 22%) and are the best depth at 7,200 examples (6.9% test
error, against 7.6% for the best plain net), and with few examples depth no longer costs much
(100 examples: 22.4% at eight layers against 56.2%).

`--batch-norm` puts a `nets.BatchNorm` between every hidden Dense and its sigmoid, trained on
each mini-batch's statistics and measured with those of the run's whole training subset
(`nets.with_population_statistics`, in `training.curves`). It also makes eight layers trainable
(2026-12-05, 103 s: train error 0-0.27% at every size) and the best depth at 7,200 examples
(6.4% test error; 1, 2, 4, 8 layers 8.1, 7.0, 6.6, 6.4%), but it generalises worse from few
examples at every depth (100 examples: 35.5, 34.4, 32.9, 30.2%, against 22.0% for one plain
layer). Measured instead with the test digits' own statistics (the run before
`with_population_statistics`), the test errors were within 0.5% of these: 35.7, 34.0, 32.5,
30.1% at 100 examples, 8.2, 7.1, 6.7, 6.3% at 7,200.

`--activation relu` and `--activation gelu` (2026-12-06, 51 s and 64 s wall with the others'
defaults, weights U(+-2.4/sqrt(F)) as for the sigmoid): without identity paths or
normalisation eight layers of either train (train error at most 0.5% at every size), so what
stopped the sigmoid net was its slope of at most 1/4, not depth. Test error, mean of 3 seeds,
1 / 2 / 4 / 8 hidden layers:

    size    relu                          gelu
    100     0.217 0.226 0.233 0.287       0.217 0.224 0.236 0.300
    900     0.098 0.100 0.103 0.115       0.097 0.096 0.102 0.107
    7,200   0.063 0.061 0.069 0.071       0.061 0.059 0.063 0.063

Both beat the sigmoid (the table above) at every depth and size (7,200: 0.079, 0.077, 0.076,
0.280);
the best depth at 7,200 is two for both; GELU's 8-layer net is within 0.4% of its best where
ReLU's is 1.0% behind.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax

import nets
from training import data, plots, results
from training.config import ConfigError, option, parse, run_main
from training.curves import init_params, labelled_subsets, learning_curves
from training.harness import open_run

EXPERIMENT = "depth"
# The USPS training digits, len(data.load_usps("train")[0]): a literal, so that the bound on
# --sizes in Config needs no data file at import.
TRAIN_SIZE = 7291


@dataclasses.dataclass(frozen=True)
class Config:
    depths: tuple[int, ...] = option((1, 2, 4, 8), "numbers of hidden layers", ge=1)
    sizes: tuple[int, ...] = option((100, 300, 900, 2400, 7200), "training-set sizes, each "
                                    "a divisor of the largest", ge=10, le=TRAIN_SIZE)
    width: int = option(64, "units in every hidden layer", ge=1)
    activation: str = option("sigmoid", "hidden activation (any of nets.ACTIVATIONS)",
                             choices=tuple(nets.ACTIVATIONS))
    residual: bool = option(False, "hidden layers 2, 3, ... as residual blocks h + act(h W + b) "
                            "(the same parameters, identity paths added)")
    batch_norm: bool = option(False, "BatchNorm between every hidden Dense and its activation "
                              "(measured with the training subset's statistics)")
    updates: int = option(2000, "least mini-batch updates per run, whatever the size (made in "
                                "whole passes; the results give the number made)", ge=1)
    batch_size: int = option(64, "mini-batch size (the whole set when it is smaller)", ge=1)
    lr: float = option(1e-3, "Adam learning rate", gt=0)
    l2: float = option(0.0, "lambda of the lecture's penalty lambda/(2m) sum w^2", ge=0)
    seeds: int = option(3, "seeds (subset, initialisation, order), vmapped", ge=1)
    records: int = option(10, "points on each learning curve", ge=1)
    test_examples: int = option(0, "use only the first N test digits (0: all 2,007)", ge=0)
    seed: int = option(0, "base seed", ge=0)


def load(config):
    (x_train, y_train), (x_test, y_test) = data.load_usps_splits(
        test_examples=config.test_examples)
    return (x_train, y_train), (x_test, data.one_hot(y_test, 10))


def common_length_subsets(config, x_train, y_train):
    """(x, targets) of shape (sizes x seeds, max(sizes), ...): each seed's random subset of
    each size, repeated max(sizes) / size times, so that every run has the same shapes and
    all of them share one compiled program per depth. The mean loss and the error over the
    repeated set are those over the subset (every example appears equally often)."""
    length = max(config.sizes)
    xs, targets = [], []
    for size in config.sizes:
        x, t = labelled_subsets(x_train, y_train, size, config.seeds, config.seed,
                                classes=10)
        xs.append(np.tile(np.asarray(x), (1, length // size, 1)))
        targets.append(np.tile(np.asarray(t), (1, length // size, 1)))
    return jnp.asarray(np.concatenate(xs)), jnp.asarray(np.concatenate(targets))


def main(argv=None):
    config, args = parse(Config, argv, __doc__, prog=f"python -m experiments.{EXPERIMENT}")
    uneven = [size for size in config.sizes if max(config.sizes) % size]
    if uneven:
        raise ConfigError(f"option --sizes: {uneven} do not divide the largest size "
                          f"{max(config.sizes)}; allowed: divisors of it (see the docstring)")
    (x_train, y_train), test = load(config)  # its checks before config.json
    run = open_run(EXPERIMENT, config, args)
    objective = nets.lecture_objective(config.l2)
    optimizer = optax.adam(config.lr)
    seconds = {"compile": 0.0, "run": 0.0}
    finals, history = {}, []
    subsets = common_length_subsets(config, x_train, y_train)
    for depth in config.depths:
        model = nets.build_mlp(x_train.shape[1], 10, hidden_layers=depth,
                               hidden_units=config.width, activation=config.activation,
                               residual=config.residual, batch_norm=config.batch_norm)
        keys = jax.random.split(jax.random.fold_in(jax.random.key(config.seed), depth),
                                len(config.sizes) * config.seeds)
        params = init_params(model, keys, x_train.shape[1])
        curve, spent = learning_curves(model, objective, optimizer, params, keys, subsets, test,
                                       updates=config.updates, batch_size=config.batch_size,
                                       records=config.records)
        for phase in ("compile", "run"):
            seconds[phase] += spent[phase]
        for index, size in enumerate(config.sizes):
            runs = slice(index * config.seeds, (index + 1) * config.seeds)
            train_error, test_error = curve["train_error"][runs], curve["test_error"][runs]
            history += [{"depth": depth, "size": size, "updates": updates,
                         "train_error": train_error[:, r], "test_error": test_error[:, r]}
                        for r, updates in enumerate(curve["updates"])]
            finals[depth, size] = {
                "test_error": float(test_error[:, -1].mean()),
                "test_error_std": results.sample_sd(test_error[:, -1]),
                "train_error": float(train_error[:, -1].mean()),
                "best_test_error": float(test_error.min(axis=1).mean()),
                "updates": curve["updates"][-1],
            }
            print(f"{depth} hidden layers, {size} examples: test error "
                  f"{finals[depth, size]['test_error']:.4f}, train error "
                  f"{finals[depth, size]['train_error']:.4f}", flush=True)
    metrics_out = {name: {str(depth): {str(size): finals[depth, size][name]
                                       for size in config.sizes} for depth in config.depths}
                   for name in ("test_error", "test_error_std", "train_error",
                                "best_test_error")}
    # Every run makes the same updates (the same repeated set, batch and passes): at least
    # --updates, whole passes in --records chunks (training.curves.passes_for).
    metrics_out["updates"] = finals[config.depths[0], config.sizes[0]]["updates"]
    metrics_out["best_depth"] = {str(size): min(config.depths,
                                                key=lambda d, s=size: finals[d, s]["test_error"])
                                 for size in config.sizes}
    rows = [{"hidden layers": depth, "size": size, **finals[depth, size]}
            for depth in config.depths for size in config.sizes]
    results.write_results(run.workdir, EXPERIMENT, dataclasses.asdict(config), metrics_out,
                          history, seconds, table=rows)
    sizes = np.array(config.sizes)
    plots.save_curves(run.workdir / "depth.png", [
        {"xlabel": "log10(training examples)", "ylabel": f"{name.replace('_', ' ')} "
         f"(mean of {config.seeds} seeds)", "log": True,
         "series": {f"{depth} hidden": (np.log10(sizes), np.array(
             [finals[depth, size][name] for size in config.sizes]))
             for depth in config.depths}}
        for name in ("test_error", "train_error")],
        title=f"USPS, {config.width}-unit {config.activation} layers"
              f"{variant(config)}, {metrics_out['updates']} updates: error "
              "against training-set size")
    results.save_and_print_table(run.workdir, render(config, finals, metrics_out, seconds,
                                                     run.workdir))
    return metrics_out


def variant(config):
    """' (residual, batch norm)', ' (residual)', ... or '' for the plain nets."""
    parts = [part for part, on in (("residual", config.residual),
                                   ("batch norm", config.batch_norm)) if on]
    return f" ({', '.join(parts)})" if parts else ""


def render(config, finals, metrics_out, seconds, workdir):
    table = [{"size": size, **{f"{depth} hidden": finals[depth, size]["test_error"]
                               for depth in config.depths},
              "best depth": metrics_out["best_depth"][str(size)]} for size in config.sizes]
    train = [{"size": size, **{f"{depth} hidden": finals[depth, size]["train_error"]
                               for depth in config.depths}} for size in config.sizes]
    return "\n".join([
        f"## USPS test error (mean of {config.seeds} seeds) after {metrics_out['updates']} "
        f"updates (--updates {config.updates}, rounded up to whole passes), "
        f"{config.width}-unit {config.activation} hidden layers"
        f"{variant(config)}",
        results.markdown_table(table),
        "## Training error",
        results.markdown_table(train),
        f"compile {seconds['compile']:.1f} s, run {seconds['run']:.1f} s. Results in {workdir}",
    ])


if __name__ == "__main__":
    run_main(main, EXPERIMENT)
