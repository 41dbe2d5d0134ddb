"""Greedy layer-wise unsupervised pretraining against random initialisation, on USPS digits.

    python -m experiments.pretraining [--workdir DIR] [--labelled 100,500,7291] [--seeds 3]
        [--hidden-layers 4] [--width 128] [--optimizer adam|sgd] [--finetune-updates 1500]

"What changed" in the lecture: pretraining, the unsupervised learning of the first layers'
weights. The net: a sigmoid MLP 256 - ... - 10 (logits), the lecture's objective (sigmoid
cross-entropy, lambda = --l2), --hidden-layers of --width units. Two starts for the same
net and the same fine-tuning:

  random      weights U(+-2.4/sqrt(F)), biases 0 (`nets.build_mlp`'s default);
  pretrained  hidden layers 1..--pretrained-layers taken from autoencoders trained greedily,
              one layer at a time (`nets.autoencoder`: Dense -> Sigmoid -> Dense, linear
              reconstruction, MSE against the input, the hand-written backward of those layers
              through the manual engine): the first on the 7,291 USPS training images, each next
              one on the codes of the layers below; labels are not used. The output layer (and
              any hidden layer above --pretrained-layers) keeps its random initialisation.

Both are then fine-tuned on the labels of --labelled examples (for each seed a different random
subset of the training set; all 7,291 for the last size): --finetune-updates mini-batch updates
of --batch-size (min(batch, n) when n is smaller), in passes of a new random order, with the
same optimizer; the held-out error is measured on the 2,007 USPS test digits. Unsupervised
pretraining sees all 7,291 training images (without their labels) in every case: the
semi-supervised setting, where unlabelled images are cheap and labels are not. Every seed's
pretraining, subset, initialisation and order are its own; seeds are vmapped.

Writes results.json (the README's keys; metrics: test error mean and std over seeds (n - 1 in
the denominator) per size and start, the pretraining gain, each autoencoder's reconstruction
MSE and the fraction of its inputs' variance left unexplained; history: per pass of
pretraining, those per layer and seed; per record of fine-tuning, the train and test error per
size, start and seed), results.md (the table), curves.png (mean train and test error against
updates, one panel per size) and autoencoders.png (unexplained variance per pass, per layer).

Measured on the 2-core CPU (jax 0.10.2, shared with other jobs), defaults (4 hidden layers of
128, 10 pretraining passes per layer, at least 1,500 fine-tuning updates of 64 with Adam 1e-3,
3 seeds): 38 s wall (compile 9 s, run 23 s, of which pretraining 8 s; 52 s while other
jobs ran).

    labelled   updates   random            pretrained        pretrained better
    100          1,520   0.255 +- 0.012    0.247 +- 0.028    2 of 3 seeds
    500          1,600   0.133 +- 0.009    0.133 +- 0.005    2 of 3
    7,291        2,280   0.068 +- 0.004    0.067 +- 0.002    1 of 3
    (USPS test error, mean +- std over seeds, with n in the denominator then: times 1.22 for
    the n - 1 reported now; both fit their training sets: train error 0 for
    100 and 500, 0.25% and 0.23% for 7,291)

The autoencoders leave 10%, 13%, 28% and 48% of their inputs' variance unexplained, and that
variance shrinks layer by layer (0.47, 0.068, 0.017, 0.0036): the deeper codes vary little.
All four are still improving at the tenth pass (autoencoders.png): --pretrain-passes buys more.

What it shows: with this recipe, greedy pretraining buys nothing measurable in the end. The
differences (0.8, 0.0 and 0.1 points) are smaller than the spread over seeds, at every number
of labels, including 100, where unlabelled data should help most. It helps early: after the
first chunk of fine-tuning on all 7,291 labels (114 updates) the test error is 0.58 against
0.64, and after 76 updates on 100 labels 0.71 against 0.74, and the pretrained curves stay a
little lower for the first few hundred updates (curves.png). With today's initialisation and
Adam the deep sigmoid net trains from random weights, which removes most of what pretraining
was for in 2006. A caution: with `--optimizer sgd` (lr 0.5 in both phases, far too large for
an autoencoder's summed squared error) the second autoencoder explained none of its inputs'
variance (it learned their mean: 1.005 unexplained) and its codes, the inputs of the third,
came out constant (variance 2.5e-19); the pretrained nets then stayed at 82% test error at
every size while the random ones reached 27.6%, 14.6% and 6.8%: a pretraining that goes wrong
is worse than none.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax

import nets
from nets import autoencoder
from training import data, optim, plots, procedures, results, timing
from training.config import ConfigError, option, parse, run_main
from training.curves import init_params, labelled_subsets, learning_curves
from training.harness import open_run

EXPERIMENT = "pretraining"
STARTS = ("random", "pretrained")
TRAIN_SIZE = 7291


@dataclasses.dataclass(frozen=True)
class Config:
    labelled: tuple[int, ...] = option((100, 500, TRAIN_SIZE), "labelled training examples",
                                       ge=10, le=TRAIN_SIZE)
    seeds: int = option(3, "seeds (pretraining, subset, initialisation, order), vmapped", ge=1)
    hidden_layers: int = option(4, "sigmoid hidden layers", ge=1)
    width: int = option(128, "units in every hidden layer", ge=1)
    pretrained_layers: int = option(0, "hidden layers pretrained (0: all of them)", ge=0)
    pretrain_passes: int = option(10, "passes over the 7,291 images per autoencoder", ge=1)
    finetune_updates: int = option(1500, "supervised mini-batch updates", ge=1)
    batch_size: int = option(64, "mini-batch size (pretraining and fine-tuning)", ge=1)
    optimizer: str = option("adam", "update rule (both phases)", choices=("adam", "sgd"))
    lr: float = option(0.0, "learning rate; 0: 1e-3 for adam, 0.5 for sgd", ge=0)
    l2: float = option(0.0, "lambda of the lecture's penalty lambda/(2m) sum w^2", ge=0)
    records: int = option(20, "points on each learning curve", ge=1)
    train_examples: int = option(0, "use only the first N training images, for tests "
                                    "(0: all 7,291)", ge=0)
    test_examples: int = option(0, "use only the first N test digits (0: all 2,007)", ge=0)
    seed: int = option(0, "base seed", ge=0)


def load(config):
    """((x_train, labels_train), (x_test, targets_test)): x (n, 256) in [-1, 1]."""
    (x_train, y_train), (x_test, y_test) = data.load_usps_splits(config.train_examples,
                                                                 config.test_examples)
    too_many = [n for n in config.labelled if n > len(x_train)]
    if too_many:
        raise ConfigError(f"option --labelled: got {too_many}; allowed: at most the "
                          f"{len(x_train)} training images")
    return (x_train, y_train), (jnp.asarray(x_test), jnp.asarray(data.one_hot(y_test, 10)))


def make_optimizer(config) -> optax.GradientTransformation:
    if config.optimizer == "adam":
        return optax.adam(config.lr or 1e-3)
    return optim.gradient_descent(config.lr or 0.5)


def vmapped_passes(model, objective, optimizer, batch_size, passes, x_axis):
    """run(params, keys, x, targets) -> (states, records): `passes` shuffled mini-batch passes
    of `procedures.stochastic_passes` from each seed's params, vmapped over the seeds (x and
    targets too when x_axis is 0, shared when it is None)."""

    def one(params, key, x, targets):
        procedure = procedures.stochastic_passes(model, objective, optimizer, x, targets,
                                                 batch_size=batch_size, shuffle=True)
        return procedures.run_steps(procedure, procedure.init(params, key), 0, passes)

    return jax.vmap(one, in_axes=(0, 0, x_axis, x_axis))


def pretrain(config, x_unlabelled, keys, optimizer, seconds):
    """Greedy layer-wise autoencoders. Returns (encoders, history): encoders[i] is the vmapped
    (over seeds) params of layer i's `autoencoder.encoder`; history, per layer and pass, the
    reconstruction MSE per input and the fraction of the inputs' variance it leaves unexplained
    (MSE / the mean over inputs of their variance): a layer whose codes have collapsed to
    constants has a tiny MSE and nothing to explain."""
    depth = config.pretrained_layers or config.hidden_layers
    objective = nets.Objective(nets.mean_squared_error(), 0.0)
    codes, code_axis, width = jnp.asarray(x_unlabelled), None, x_unlabelled.shape[1]
    encoders, history = [], []
    units = config.width
    for index in range(depth):
        model = autoencoder.autoencoder(width, units)
        layer_keys = jax.vmap(lambda k, i=index: jax.random.fold_in(k, 100 + i))(keys)
        params = init_params(model, layer_keys, width)
        batch = min(config.batch_size, codes.shape[-2])
        run = vmapped_passes(model, objective, optimizer, batch, config.pretrain_passes,
                             code_axis)
        (state, records), spent = timing.compile_and_run(run, params, layer_keys, codes, codes)
        _add(seconds, spent)
        # E = (1/2m) sum ||x_hat - x||^2: twice E over the width is the MSE per input
        mse = 2 * np.asarray(records["energy"]) / width  # (seeds, passes)
        variance = np.mean(np.var(np.asarray(codes), axis=-2), axis=-1)  # () or (seeds,)
        fvu = mse / np.maximum(np.asarray(variance).reshape(-1, 1), np.finfo(np.float32).tiny)
        history += [{"phase": "pretrain", "layer": index + 1, "pass": p + 1,
                     "reconstruction_mse": mse[:, p].tolist(),
                     "unexplained_variance": fvu[:, p].tolist(),
                     "input_variance": np.broadcast_to(variance, mse.shape[:1]).tolist()}
                    for p in range(config.pretrain_passes)]
        encoder_params = jax.vmap(autoencoder.encoder_params)(state.params)
        encoders.append(encoder_params)
        codes = jax.jit(jax.vmap(autoencoder.encoder(units).apply, in_axes=(0, code_axis)))(
            encoder_params, codes)
        code_axis, width = 0, units
        print(f"autoencoder {index + 1}: reconstruction MSE {mse[:, -1].mean():.4g}, "
              f"unexplained variance {fvu[:, -1].mean():.3f} of {np.mean(variance):.4g}",
              flush=True)
    return encoders, history


def _add(seconds, spent):
    for phase in ("compile", "run"):
        seconds[phase] += spent[phase]


def initial_params(model, keys, encoders, start):
    """Each seed's initial params of the MLP: random, or with the encoders stacked in."""
    params = init_params(model, jax.vmap(lambda k: jax.random.fold_in(k, 1))(keys), 256)
    if start == "pretrained":
        params = jax.vmap(autoencoder.stack_encoders)(params, tuple(encoders))
    return params


def main(argv=None):
    config, args = parse(Config, argv, __doc__, prog=f"python -m experiments.{EXPERIMENT}")
    if config.pretrained_layers > config.hidden_layers:
        raise ConfigError(f"option --pretrained-layers: got {config.pretrained_layers}; "
                          f"allowed: at most the {config.hidden_layers} hidden layers")
    (x_train, y_train), test = load(config)  # its checks before config.json
    run = open_run(EXPERIMENT, config, args)
    optimizer = make_optimizer(config)
    keys = jax.random.split(jax.random.key(config.seed), config.seeds)
    seconds = {"compile": 0.0, "run": 0.0}
    encoders, history = pretrain(config, x_train, keys, optimizer, seconds)
    seconds["pretrain"] = seconds["compile"] + seconds["run"]
    model = mlp(config)
    # Both starts in one vmapped call: the first `seeds` rows random, the next pretrained.
    params = jax.tree.map(lambda *leaves: jnp.concatenate(leaves),
                          *(initial_params(model, keys, encoders, start) for start in STARTS))
    curves = {}
    for size in config.labelled:
        x, targets = labelled_subsets(x_train, y_train, size, config.seeds, config.seed,
                                      classes=10)
        both, spent = learning_curves(
            model, nets.lecture_objective(config.l2), optimizer, params,
            jnp.concatenate([keys, keys]),
            (jnp.concatenate([x, x]), jnp.concatenate([targets, targets])), test,
            updates=config.finetune_updates, batch_size=config.batch_size,
            records=config.records)
        _add(seconds, spent)
        for index, start in enumerate(STARTS):
            rows = slice(index * config.seeds, (index + 1) * config.seeds)
            curve = {"updates": both["updates"], "train_error": both["train_error"][rows],
                     "test_error": both["test_error"][rows]}
            curves[size, start] = curve
            history += [{"phase": "finetune", "labelled": size, "start": start,
                         "updates": updates, "train_error": curve["train_error"][:, r],
                         "test_error": curve["test_error"][:, r]}
                        for r, updates in enumerate(curve["updates"])]
            final = curve["test_error"][:, -1]
            print(f"n = {size}, {start}: test error {final.mean():.4f} +- "
                  f"{results.sample_sd(final):.4f}", flush=True)
    metrics_out, rows = summarize(config, curves, history)
    results.write_results(run.workdir, EXPERIMENT, dataclasses.asdict(config), metrics_out,
                          history, seconds, table=rows)
    save_plots(run.workdir, config, curves, history)
    results.save_and_print_table(run.workdir, render(config, rows, metrics_out, seconds,
                                                     run.workdir))
    return metrics_out


def mlp(config):
    """256 - width x hidden_layers - 10: sigmoid hidden units, logits out."""
    return nets.build_mlp(256, 10, hidden_layers=config.hidden_layers,
                          hidden_units=config.width)


def summarize(config, curves, history):
    """(metrics, table rows): final errors per size and start, mean and std over seeds (n - 1
    in the denominator, `results.sample_sd`)."""
    rows, by_size = [], {}
    for size in config.labelled:
        row = {"labelled": size, "updates": curves[size, "random"]["updates"][-1]}
        for start in STARTS:
            final = curves[size, start]["test_error"][:, -1]
            train = curves[size, start]["train_error"][:, -1]
            row[f"{start} test error"] = float(final.mean())
            row[f"{start} std"] = results.sample_sd(final)
            row[f"{start} train error"] = float(train.mean())
        row["gain (random - pretrained)"] = (row["random test error"]
                                             - row["pretrained test error"])
        wins = np.sum(curves[size, "pretrained"]["test_error"][:, -1]
                      < curves[size, "random"]["test_error"][:, -1])
        row["seeds pretrained better"] = f"{int(wins)}/{config.seeds}"
        rows.append(row)
        by_size[str(size)] = row
    last_pass = [h for h in history if h["phase"] == "pretrain"
                 and h["pass"] == config.pretrain_passes]
    metrics_out = {
        "test_error": {size: {start: row[f"{start} test error"] for start in STARTS}
                       for size, row in by_size.items()},
        "test_error_std": {size: {start: row[f"{start} std"] for start in STARTS}
                           for size, row in by_size.items()},
        "train_error": {size: {start: row[f"{start} train error"] for start in STARTS}
                        for size, row in by_size.items()},
        "pretraining_gain": {size: row["gain (random - pretrained)"]
                             for size, row in by_size.items()},
        "reconstruction_mse": {h["layer"]: float(np.mean(h["reconstruction_mse"]))
                               for h in last_pass},
        "unexplained_variance": {h["layer"]: float(np.mean(h["unexplained_variance"]))
                                 for h in last_pass},
        "code_variance": {h["layer"]: float(np.mean(h["input_variance"])) for h in last_pass},
        "finetune_updates": {size: row["updates"] for size, row in by_size.items()},
        # after the first of the `records` chunks: how far each start gets early on
        "test_error_first_record": {
            str(size): {start: float(curves[size, start]["test_error"][:, 0].mean())
                        for start in STARTS} for size in config.labelled},
        "updates_first_record": {str(size): curves[size, "random"]["updates"][0]
                                 for size in config.labelled},
    }
    return metrics_out, rows


def save_plots(workdir, config, curves, history):
    panels = []
    for size in config.labelled:
        series = {}
        for start in STARTS:
            curve = curves[size, start]
            series[start] = (np.array(curve["updates"]), curve["test_error"].mean(axis=0))
            series[f"{start} (train)"] = (np.array(curve["updates"]),
                                          curve["train_error"].mean(axis=0))
        panels.append({"xlabel": "fine-tuning updates", "log": True,
                       "ylabel": f"error, {size} labelled (mean of {config.seeds} seeds)",
                       "series": series})
    plots.save_curves(workdir / "curves.png", panels,
                      title="Random initialisation vs greedy autoencoder pretraining (USPS)")
    layers = sorted({h["layer"] for h in history if h["phase"] == "pretrain"})
    plots.save_curves(workdir / "autoencoders.png", [{
        "xlabel": "pass over the unlabelled images",
        "ylabel": "unexplained variance, MSE / var (mean of seeds)",
        "log": True, "series": {f"layer {layer}": (
            np.array([h["pass"] for h in history if h.get("layer") == layer]),
            np.array([np.mean(h["unexplained_variance"]) for h in history
                      if h.get("layer") == layer]))
            for layer in layers}}], title="Greedy layer-wise autoencoders")


def render(config, rows, metrics_out, seconds, workdir):
    depth = config.pretrained_layers or config.hidden_layers
    return "\n".join([
        f"## USPS test error after at least {config.finetune_updates} fine-tuning updates "
        f"(batch {config.batch_size}, {config.optimizer}), mean and std over "
        f"{config.seeds} seeds",
        results.markdown_table(rows),
        f"Net 256-{'-'.join([str(config.width)] * config.hidden_layers)}-10, sigmoid; "
        f"{depth} hidden layers pretrained as autoencoders ({config.pretrain_passes} passes "
        f"each over {config.train_examples or TRAIN_SIZE} unlabelled images); "
        "fraction of the inputs' variance the autoencoders leave unexplained, per layer: "
        + ", ".join(f"{k}: {v:.3f}" for k, v in metrics_out["unexplained_variance"].items())
        + " (variance of each layer's inputs: " + ", ".join(
            f"{v:.3g}" for v in metrics_out["code_variance"].values()) + ").",
        f"compile {seconds['compile']:.1f} s, run {seconds['run']:.1f} s (pretraining "
        f"{seconds['pretrain']:.1f} s). Results in {workdir}",
    ])


if __name__ == "__main__":
    run_main(main, EXPERIMENT)
