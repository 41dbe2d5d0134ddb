"""Numerical precision against depth: where rounding, not backpropagation, loses the gradient.

    python -m experiments.precision [--workdir DIR] [--depths 2,4,...,20] [--width 64]
        [--batch 256] [--activations sigmoid,tanh,relu] [--residual]

The lecture lists "numerical precision errors with layers" among the challenges of training.
For MLPs (`nets.build_mlp`) of 2 to 20 hidden layers of --width units (sigmoid and tanh, and
ReLU as the reference), on --batch of scikit-learn's 8x8 digits with the lecture's objective
(sigmoid cross-entropy from logits, lambda = 0), at initialisation (weights U(+-2.4/sqrt(F)),
variance 1.92/F, within 4% of He's 2/F for ReLU), we take the gradient of every layer's weights:

  * the reference: jax.grad of the same forward pass in float64;
  * the manual engine (hand-written backward) in bfloat16, float16, float32 and float64, with
    params, inputs and targets cast to that dtype (`nets.gradcheck.astype`);
  * jax.grad in the same dtype, to ask whether both are equally wrong.

Per layer and dtype (results.json "layers"): ||dE/dW_l|| (the reference's and the low-precision
one's), the relative error ||g - g_ref|| / max(||g||, ||g_ref||) of the manual and of the jax.grad
gradient against the float64 reference, the manual-vs-jax.grad difference in the same dtype, and
the fraction of entries that are exactly zero although the reference's are not (underflow).
"history" has one record per activation, depth and dtype (the first layer, the one farthest
from the error); "metrics" the worst float64 manual-vs-jax.grad error and, per activation and
dtype, the first-layer error at the greatest depth and the smallest depth at which it passes
0.5. Plots: precision.png (first-layer error against depth), norms.png (||dE/dW_l|| against
layer, deepest net), engines.png (manual and jax.grad against the reference, same dtype).

Everything runs inside `jax.enable_x64(True)`, so float64 is available whatever the process
set; the low-precision gradients are checked to come back in their own dtype. By default each
program is dispatched op by op (every primitive rounds its result to the dtype; the ops'
compilations are shared by all depths); --jit compiles each of the 240 programs whole, as
training would run them: 3.4x longer here (193 s against 56 s under the same load, 164 s of
it compiling), for the same errors
to 3 significant digits (checked on the first and last layers at depth 20, sigmoid and ReLU,
bfloat16 and float16).

Measured on the 2-core CPU (jax 0.10.2), defaults: 30 s wall (56 s while other jobs ran);
on 2026-12-04 90 s with a cold compilation cache, 14 s with it warm, the same numbers.
results.json's seconds: compile 0 (op-by-op compilations are inside "run").
First hidden layer's weight gradient, relative error against float64 jax.grad:

    hidden layers          2        6        8       10       14       20
    sigmoid bfloat16   3.0e-3   6.4e-3   7.6e-3   7.6e-3   1.3e-2   1.5e-2
    sigmoid float16    3.1e-4   3.6e-3   7.9e-2      1.0      1.0      1.0
    sigmoid float32    2.2e-7   2.3e-7   2.2e-7   2.3e-7   2.6e-7   2.6e-7
    tanh    bfloat16   3.3e-3   7.9e-3   5.1e-3   7.1e-3   1.7e-2   1.5e-2
    tanh    float16    4.0e-4   8.1e-4   5.7e-4   1.2e-3   1.6e-3   2.4e-3
    relu    bfloat16   6.6e-3   2.1e-2   3.1e-2   2.8e-2   7.6e-2   0.33
    relu    float16    1.6e-3   5.3e-3   8.0e-3   7.3e-3   3.2e-2   0.11
    (float32 <= 7.3e-7 everywhere; float64 manual vs jax.grad <= 9.2e-16, every layer)

What it shows:
  * The algorithm is exact: in float64 the hand-written backward equals jax.grad to 9e-16 at
    every depth and layer, and float32 stays within 7e-7 of the float64 gradient up to 20
    layers.
  * With sigmoid units the gradient itself shrinks by about half a decade per layer (first
    layer: 0.40 at depth 2, 3.6e-5 at depth 10, 3.3e-10 at depth 20). float16 (smallest
    normal 6e-5, subnormal 6e-8) cannot hold it: from 10 hidden layers on the first layer's
    gradient is exactly zero (error 1.0: every entry that should be non-zero underflowed),
    and at depth 20 the ten lowest layers are all zero. bfloat16 has float32's exponent range
    and keeps the same gradients with its 8-bit mantissa's 1e-2 error. What loses the gradient
    is the exponent range of the format, not backpropagation.
  * tanh keeps the gradient's size (norms 3 to 8 at every depth), so its errors stay at the
    formats' rounding level (float16 ~1e-3, bfloat16 ~1e-2).
  * ReLU (the reference) does not vanish either, but its low-precision error grows with depth
    (bfloat16 0.33 and float16 0.11 at depth 20): rounding in the forward pass flips units
    across 0 and the errors compound.
  * Equally wrong: in the same low precision the manual engine and jax.grad differ from each
    other by far less than either differs from the truth (ReLU, depth 20: 1.0e-2 apart in
    bfloat16 and 1.2e-3 in float16, against errors of 0.33 and 0.11; sigmoid float16 from
    depth 10: both exactly zero): the error comes from the rounded forward pass both share,
    not from either backward pass.

The activations later nets use (2026-12-06, `--activations
relu,gelu,silu,elu,softplus,leaky_relu`, 35 s): ||dE/dW_1|| (float64) at depths 2 and 20, and
float16's error and zeroed entries at 20:

    relu        2.57 -> 0.38      0.11,   0 zeroed
    gelu        2.30 -> 0.0022    7.8e-3, 4.6%
    silu        2.06 -> 0.0018    7.9e-3, 4.7%
    elu         5.14 -> 19.1      1.6e-3, 0
    softplus    2.00 -> 0.40      9.9e-4, 0.05%
    leaky_relu  2.57 -> 0.47      0.11,   0.4%

Near 0 GELU's and SiLU's slope is about 1/2, its square 1/4, where ReLU's squared slope
averages 1/2, so at this init (weights of variance 1.92/F, which keeps ReLU's gradient at
its size) theirs shrinks, about 0.17 decades a layer (the sigmoid's 1/2 decade); ELU passes
a slope of 1 above 0 and more than 0 below, and its gradient grows. float64 manual vs
jax.grad <= 9.5e-16 for all six.

`--residual` (2026-12-03, 45 s): hidden layers 2, 3, ... become residual blocks h + act(h W + b)
with the same parameters. The first layer's gradient then keeps its size: sigmoid norms 1.7,
2.3 and 2.2 at depths 2, 10 and 20 (plain: 0.40, 3.6e-5, 3.3e-10), so float16 holds it
(relative error <= 6.5e-4 at every depth, against 1.0 from depth 10) and bfloat16 stays at its
rounding level (<= 6.4e-3). Without normalisation ReLU blocks make it grow instead (norm 5.1 at
depth 2, 4.6e4 at depth 20), yet its low-precision errors stay small (bfloat16 <= 9.3e-3,
float16 <= 2.8e-3, against 0.33 and 0.11 plain at depth 20); tanh grows from 6.8 to 44
(bfloat16 <= 3.3e-2, float16 <= 4.2e-3). float64 manual vs jax.grad <= 4.8e-16 throughout.
"""
from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

import nets
from nets.gradcheck import astype, named_parameters, relative_error
from training import data, plots, results, timing
from training.config import option, parse, run_main
from training.harness import open_run

EXPERIMENT = "precision"
DTYPES = ("bfloat16", "float16", "float32", "float64")
ACTIVATIONS = ("sigmoid", "tanh", "relu")
LOST = 0.5  # a first-layer relative error above this: the gradient's direction is mostly noise


@dataclasses.dataclass(frozen=True)
class Config:
    activations: tuple[str, ...] = option(ACTIVATIONS, "hidden activations (any of "
                                          "nets.ACTIVATIONS: gelu, silu, elu, ...)",
                                          choices=tuple(nets.ACTIVATIONS))
    depths: tuple[int, ...] = option(tuple(range(2, 21, 2)), "numbers of hidden layers", ge=1)
    width: int = option(64, "units in every hidden layer", ge=1)
    batch: int = option(256, "digits the gradient is taken on", ge=1, le=1797)
    seed: int = option(0, "seed of the initialisation and of the digits picked", ge=0)
    residual: bool = option(False, "hidden layers 2, 3, ... as residual blocks h + act(h W + b) "
                            "(`nets.build_mlp(..., residual=True)`: identity paths added)")
    jit: bool = option(False, "jit each gradient program (as training runs it) instead of "
                              "dispatching it op by op (the default: 3x faster here, as the "
                              "ops' compilations are shared across depths)")


def load_batch(config):
    """(x, targets): config.batch digits (batch, 64) in [0, 1] and one-hot rows (batch, 10)."""
    images, labels = data.load_digits()
    picked = np.random.default_rng(config.seed).permutation(len(images))[: config.batch]
    return images[picked], data.one_hot(labels[picked], 10)


def gradients(model, objective, params, x, targets, seconds, jit):
    """{(engine, dtype): gradient pytree as float64 NumPy}, with "reference" = jax.grad in
    float64. Jitted per program (`jit`) or dispatched op by op; adds the times to `seconds`."""
    engines = {"manual": nets.manual(model, objective), "autodiff": nets.autodiff(model, objective)}
    out = {}
    with jax.enable_x64(True):
        for dtype in DTYPES:
            arguments = astype((params, jnp.asarray(x), jnp.asarray(targets)), jnp.dtype(dtype))
            for name, value_and_grad in engines.items():
                if jit:
                    (_, grad), spent = timing.compile_and_run(value_and_grad, *arguments)
                else:
                    tick = time.perf_counter()
                    _, grad = jax.block_until_ready(value_and_grad(*arguments))
                    spent = {"compile": 0.0, "run": time.perf_counter() - tick}
                for phase in ("compile", "run"):
                    seconds[phase] += spent[phase]
                got = {leaf.dtype.name for leaf in jax.tree.leaves(grad)}
                if got != {dtype}:  # a silent promotion would measure the wrong precision
                    raise AssertionError(f"{name} in {dtype} returned gradients in {got}")
                out[name, dtype] = jax.tree.map(lambda g: np.asarray(g, np.float64), grad)
    out["reference"] = out["autodiff", "float64"]
    return out


def layer_rows(model, params, grads, activation, depth):
    """One record per weight matrix (hidden1..hiddenD, output) and dtype."""
    rows = []
    weights = [(layer, path) for layer, name, path in named_parameters(model, params)
               if name == "w"]
    for index, (layer, path) in enumerate(weights, start=1):
        reference = _leaf(grads["reference"], path)
        for dtype in DTYPES:
            manual, autodiff = _leaf(grads["manual", dtype], path), _leaf(
                grads["autodiff", dtype], path)
            rows.append({
                "activation": activation, "depth": depth, "layer": index, "name": layer,
                "distance_from_output": len(weights) - index, "dtype": dtype,
                "reference_norm": float(np.linalg.norm(reference)),
                "manual_norm": float(np.linalg.norm(manual)),
                "manual_rel_err": relative_error(manual, reference),
                "autodiff_rel_err": relative_error(autodiff, reference),
                "manual_vs_autodiff": relative_error(manual, autodiff),
                "underflow_fraction": float(np.mean((manual == 0) & (reference != 0))),
            })
    return rows


def _leaf(tree, path):
    for key in path:
        tree = tree[getattr(key, "key", getattr(key, "idx", None))]
    return tree


def summarize(rows, config):
    """(history, metrics): first-layer records per activation, depth and dtype; headlines."""
    first = [r for r in rows if r["layer"] == 1]
    history = [{k: r[k] for k in ("activation", "depth", "dtype", "reference_norm",
                                  "manual_norm", "manual_rel_err", "autodiff_rel_err",
                                  "manual_vs_autodiff", "underflow_fraction")} for r in first]
    float64 = [r["manual_vs_autodiff"] for r in rows if r["dtype"] == "float64"]
    deepest = max(config.depths)
    metrics = {"float64_manual_vs_autodiff_max": max(float64), "deepest": deepest,
               "first_layer_rel_err_at_deepest": {}, "first_depth_lost": {},
               "first_layer_manual_vs_autodiff_at_deepest": {},
               "first_layer_reference_norm_at_deepest": {}}
    for activation in config.activations:
        for key in ("first_layer_rel_err_at_deepest", "first_depth_lost",
                    "first_layer_manual_vs_autodiff_at_deepest"):
            metrics[key][activation] = {}
        for dtype in DTYPES:
            mine = sorted((r for r in first if r["activation"] == activation
                           and r["dtype"] == dtype), key=lambda r: r["depth"])
            at_deepest = mine[-1]
            metrics["first_layer_rel_err_at_deepest"][activation][dtype] = at_deepest[
                "manual_rel_err"]
            metrics["first_layer_manual_vs_autodiff_at_deepest"][activation][dtype] = (
                at_deepest["manual_vs_autodiff"])
            lost = [r["depth"] for r in mine if not r["manual_rel_err"] <= LOST]
            metrics["first_depth_lost"][activation][dtype] = lost[0] if lost else None
            metrics["first_layer_reference_norm_at_deepest"][activation] = at_deepest[
                "reference_norm"]
    return history, metrics


def main(argv=None):
    config, args = parse(Config, argv, __doc__, prog=f"python -m experiments.{EXPERIMENT}")
    run = open_run(EXPERIMENT, config, args)
    x, targets = load_batch(config)
    objective = nets.lecture_objective(0.0)
    seconds = {"compile": 0.0, "run": 0.0}
    rows = []
    for activation in config.activations:
        for depth in config.depths:
            model = nets.build_mlp(x.shape[1], 10, hidden_layers=depth,
                                   hidden_units=config.width, activation=activation,
                                   residual=config.residual)
            key = jax.random.fold_in(jax.random.key(config.seed), depth)
            params = model.init(key, (-1, x.shape[1]))[1]
            grads = gradients(model, objective, params, x, targets, seconds, config.jit)
            rows += layer_rows(model, params, grads, activation, depth)
        print(f"{activation}: depths {list(config.depths)} done", flush=True)
    history, metrics = summarize(rows, config)
    results.write_results(run.workdir, EXPERIMENT, dataclasses.asdict(config), metrics, history,
                          seconds, layers=rows, lost_threshold=LOST)
    save_plots(run.workdir, rows, config)
    results.save_and_print_table(run.workdir, render(rows, metrics, seconds, config,
                                                     run.workdir))
    return metrics


def _positive(values):
    """Values for a log axis: zeros (exact results, or total underflow) become NaN, unplotted."""
    values = np.asarray(values, np.float64)
    return np.where(values > 0, values, np.nan)


def save_plots(workdir, rows, config):
    def series(activation, engines=("manual_rel_err",), layer=1):
        """{label: (depths, error)} for one activation, one line per dtype and engine."""
        out = {}
        for dtype in DTYPES:
            for engine in engines:
                mine = [r for r in rows if r["activation"] == activation and r["dtype"] == dtype
                        and r["layer"] == layer]
                label = dtype if len(engines) == 1 else f"{dtype} {_ENGINE_LABEL[engine]}"
                out[label] = (np.array([r["depth"] for r in mine]),
                              _positive([r[engine] for r in mine]))
        return out

    depths = dict(xlabel="hidden layers", log=True)
    plots.save_curves(workdir / "precision.png", [
        {**depths, "ylabel": f"{a}: first layer, rel. error vs float64 jax.grad",
         "series": series(a)} for a in config.activations],
        title="Manual engine's gradient of the first layer's weights, by dtype")
    plots.save_curves(workdir / "engines.png", [
        {**depths, "ylabel": f"{a}: first layer, rel. error vs float64 jax.grad",
         "series": {k: v for k, v in series(a, ("manual_rel_err", "autodiff_rel_err")).items()
                    if not k.startswith("float64")}}
        for a in config.activations],
        title="Same precision, two engines: manual backward vs jax.grad")
    deepest = max(config.depths)
    panels = []
    for activation in config.activations:
        mine = [r for r in rows if r["activation"] == activation and r["depth"] == deepest]
        norms = {"float64 jax.grad (reference)": (
            np.array([r["layer"] for r in mine if r["dtype"] == "float64"]),
            _positive([r["reference_norm"] for r in mine if r["dtype"] == "float64"]))}
        for dtype in DTYPES[:-1]:
            norms[f"{dtype} manual"] = (np.array([r["layer"] for r in mine if r["dtype"] == dtype]),
                                       _positive([r["manual_norm"] for r in mine
                                                  if r["dtype"] == dtype]))
        panels.append({"xlabel": "layer (1 = first hidden, last = output)", "log": True,
                       "ylabel": f"{activation}: ||dE/dW_l||", "series": norms})
    plots.save_curves(workdir / "norms.png", panels,
                      title=f"Gradient norm per layer, {deepest} hidden layers (gaps: exactly 0)")


_ENGINE_LABEL = {"manual_rel_err": "manual", "autodiff_rel_err": "jax.grad"}


def render(rows, metrics, seconds, config, workdir):
    first = [r for r in rows if r["layer"] == 1]
    table = []
    for activation in config.activations:
        for depth in config.depths:
            mine = {r["dtype"]: r for r in first
                    if r["activation"] == activation and r["depth"] == depth}
            table.append({
                "activation": activation, "hidden layers": depth,
                "||dE/dW_1|| (f64)": mine["float64"]["reference_norm"],
                **{f"{d}": mine[d]["manual_rel_err"] for d in DTYPES},
                **{f"{d} vs jax.grad same dtype": mine[d]["manual_vs_autodiff"]
                   for d in DTYPES[:2]},
                "f16 zeros": mine["float16"]["underflow_fraction"],
            })
    worst = metrics["float64_manual_vs_autodiff_max"]
    return "\n".join([
        "## First hidden layer's weight gradient: relative error of the manual engine against "
        "float64 jax.grad, by dtype",
        results.markdown_table(table),
        f"float64 manual vs jax.grad, every layer and depth: at most {worst:.2e}. "
        f"\"f16 zeros\": fraction of float16 entries that are exactly 0 where the reference's "
        f"are not. Width {config.width}, batch {config.batch}.",
        f"compile {seconds['compile']:.1f} s, run {seconds['run']:.1f} s. Results in {workdir}",
    ])


if __name__ == "__main__":
    run_main(main, EXPERIMENT)
