"""LeCun's backpropagated Gauss-Newton diagonal beside the exact matrices computed by jax.

    python -m experiments.curvature [--workdir DIR] [--batch 8] [--seed 0]

For each net, per layer and parameter tensor: the diagonal second derivatives that
`nets.engines.curvature_diagonal` backpropagates by hand (the h of the diagonal
Levenberg-Marquardt optimizer), the diagonal of the exact Gauss-Newton matrix J^T H J
(`nets.gradcheck.gauss_newton_diagonal`, jacobians by jax) and, where the net is small enough,
jnp.diag(jax.hessian(E)). Relative errors are norm ratios over the tensor. What to expect:
the backpropagated diagonal equals the Gauss-Newton diagonal for the last layer and wherever a
parameter reaches the output by a single path; elsewhere it drops the cross terms (shared
weights, several paths), as LeCun et al. 1989 (section 5) accept; the Gauss-Newton diagonal
differs from the Hessian's by the residual-times-second-derivative terms. The nets: three
small tanh MLPs (one with a BatchNorm before each hidden tanh), a small convolutional net,
LeNet-1989 and a 2-block transformer on token ids (its logits flattened under MSE), whose
attention applies the diagonal rule stage by stage (nets/attention.py). Measured 2026-12-03
(batch 8, seed 0, 91 s on 2 CPU cores): the transformer's final LayerNorm and output layer
equal to the Gauss-Newton diagonal within 2.1e-15, its blocks 16-80% off, attention 34-80%.
The BatchNorm MLP (2026-12-05, batch 8): exact (<= 2e-16) after the last BatchNorm (its g
and b, the output layer); before it the rule, blind to the examples' coupling, is 26-89% off
(norm1's g 66%, b 89%), and the biases just before each BatchNorm, which change no output
(Gauss-Newton diagonals 1.7e-33 and 6.8e-33), get h = 0.24 and 0.48 on average.

Writes results.json (metrics: the largest relative errors; "rows": one per tensor; "seconds":
each net's wall time, compilation included, as the diagonals run eagerly), results.md
and curvature.png (every diagonal entry against the exact one, per net; `--nets` picks nets).
"""
from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

import nets
from nets import gradcheck, models
from training import plots, results
from training.config import option, parse, run_main
from training.harness import open_run

EXPERIMENT = "curvature"


NAMES = ("mlp_1_hidden_1_output", "mlp_2_hidden_tanh", "mlp_2_hidden_tanh_batchnorm",
         "small_conv", "lenet1989", "transformer_lm_2_blocks")


@dataclasses.dataclass(frozen=True)
class Config:
    batch: int = option(8, "examples the diagonals are averaged over", ge=1)
    seed: int = option(0, "seed of the parameters and the inputs", ge=0)
    nets: tuple[str, ...] = option((), "comma-separated nets to compare (default: all)",
                                   choices=NAMES)


def nets_to_compare():
    """(name, model, objective, input shape, classes, with the full Hessian?, vocabulary):
    inputs are N(0, 1), or with a vocabulary token ids; targets +-1 for every output."""
    mse = nets.Objective(nets.mean_squared_error(), 0.0)
    transformer = nets.serial(nets.transformer_lm(5, context=6, features=8, heads=2, blocks=2),
                              nets.Flatten(), name="transformer_lm")
    return [
        ("mlp_1_hidden_1_output", nets.build_mlp(6, 1, hidden_units=5, activation="tanh",
                                                 output_activation="tanh"), mse, (6,), 1, True),
        ("mlp_2_hidden_tanh", nets.build_mlp(6, 3, hidden_layers=2, hidden_units=5,
                                             activation="tanh", output_activation="tanh"),
         mse, (6,), 3, True),
        # the same with a BatchNorm before each hidden tanh: the examples of the batch coupled
        ("mlp_2_hidden_tanh_batchnorm",
         nets.build_mlp(6, 3, hidden_layers=2, hidden_units=5, activation="tanh",
                        output_activation="tanh", batch_norm=True), mse, (6,), 3, True),
        ("small_conv", nets.serial(nets.Conv2D(3, 3, padding="SAME", pad_value=-1.0),
                                   nets.Tanh(), nets.Flatten(), nets.Dense(2), nets.Tanh()),
         mse, (5, 5, 1), 2, True),
        ("lenet1989", models.lenet1989(), mse, (16, 16, 1), 10, False),
        # 6 ids of 5 tokens in, the 6 x 5 logits (flattened) against +-1 targets
        ("transformer_lm_2_blocks", transformer, mse, (6,), 30, True, 5),
    ]


def diagonals(name, model, objective, input_shape, classes, with_hessian, vocabulary=None, *,
              batch, seed):
    """[(layer, param, backpropagated, gauss_newton, hessian or None)], one per parameter
    tensor, as float64 NumPy arrays, at a random point and batch drawn from seed and name."""
    def random_point(key):
        key_params, key_x, key_t = jax.random.split(key, 3)
        params = gradcheck.astype(model.init(key_params, (-1, *input_shape))[1], jnp.float64)
        x = (jax.random.normal(key_x, (batch, *input_shape), jnp.float64) if vocabulary is None
             else jax.random.randint(key_x, (batch, *input_shape), 0, vocabulary))
        targets = jnp.where(jax.random.bernoulli(key_t, 0.5, (batch, classes)), 1.0, -1.0)
        return params, x, targets

    with jax.enable_x64(True):
        # compiled whole, not run op by op: for two small nets that compiled 141 programs,
        # now 12 (20.3 against 16.1 s)
        params, x, targets = jax.jit(random_point)(
            jax.random.fold_in(jax.random.key(seed), len(name)))
        backpropagated = jax.jit(nets.engines.curvature_diagonal(model, objective))(
            params, x, targets)
        exact = gradcheck.gauss_newton_diagonal(model, objective, params, x, targets)
        hessian = (jax.tree.leaves(gradcheck.hessian_diagonal(model, objective, params, x,
                                                               targets))
                   if with_hessian else [None] * len(jax.tree.leaves(exact)))
        return [(layer, param, np.asarray(h_bp), np.asarray(h_gn),
                 None if h_hess is None else np.asarray(h_hess))
                for (layer, param, _), h_bp, h_gn, h_hess in zip(
                    gradcheck.named_parameters(model, params), jax.tree.leaves(backpropagated),
                    jax.tree.leaves(exact), hessian)]


def rows_of(name, tensors) -> list[dict]:
    """One row per tensor of `diagonals`: means, relative errors (norm ratios), minimum."""
    return [{
        "net": name, "layer": layer, "param": param,
        "mean_backpropagated": float(np.mean(h_bp)),
        "mean_gauss_newton": float(np.mean(h_gn)),
        "mean_hessian": None if h_hess is None else float(np.mean(h_hess)),
        "backpropagated_vs_gauss_newton": gradcheck.relative_error(h_bp, h_gn),
        "gauss_newton_vs_hessian": (None if h_hess is None
                                    else gradcheck.relative_error(h_gn, h_hess)),
        "min_backpropagated": float(np.min(h_bp)),
    } for layer, param, h_bp, h_gn, h_hess in tensors]


def compare(name, *entry, batch, seed) -> list[dict]:
    """The rows of one net of `nets_to_compare` (name first, then the rest of its entry)."""
    return rows_of(name, diagonals(name, *entry, batch=batch, seed=seed))


def plot_panels(name, tensors) -> list[dict]:
    """Every entry of the backpropagated diagonal against the exact Gauss-Newton one, one
    series per layer; and, where the Hessian was computed, the Gauss-Newton diagonal against
    the Hessian's."""
    layers = list(dict.fromkeys(layer for layer, *_ in tensors))

    def series(pick):
        return {layer: tuple(np.concatenate(arrays) for arrays in zip(*[
            (h_gn.ravel(), pick(h_bp, h_hess).ravel())
            for tensor_layer, _, h_bp, h_gn, h_hess in tensors if tensor_layer == layer]))
            for layer in layers}

    panels = [{"title": name, "xlabel": "Gauss-Newton diagonal (jacobians)",
               "ylabel": "backpropagated diagonal", "series": series(lambda bp, _: bp)}]
    if tensors[0][4] is not None:
        panels.append({"title": f"{name}: Hessian", "xlabel": "Gauss-Newton diagonal",
                       "ylabel": "diag(jax.hessian)",
                       "series": series(lambda _, hess: hess)})
    return panels


def main(argv=None):
    config, args = parse(Config, argv, __doc__, prog=f"python -m experiments.{EXPERIMENT}")
    run = open_run(EXPERIMENT, config, args)
    rows, panels, seconds = [], [], {}
    for entry in nets_to_compare():
        if config.nets and entry[0] not in config.nets:
            continue
        start = time.perf_counter()
        tensors = diagonals(*entry, batch=config.batch, seed=config.seed)
        # each net's three diagonals run eagerly, op by op: compiling is part of computing
        seconds[f"{entry[0]}_wall"] = time.perf_counter() - start
        rows += rows_of(entry[0], tensors)
        panels += plot_panels(entry[0], tensors)
    last_layers = [r for r in rows if r["layer"] == "output" or r["net"] ==
                   "mlp_1_hidden_1_output"]
    metrics_out = {
        "max_backpropagated_vs_gauss_newton": max(r["backpropagated_vs_gauss_newton"]
                                                  for r in rows),
        "max_backpropagated_vs_gauss_newton_where_exact": max(
            r["backpropagated_vs_gauss_newton"] for r in last_layers) if last_layers else None,
        "all_backpropagated_non_negative": all(r["min_backpropagated"] >= 0 for r in rows),
    }
    results.write_results(run.workdir, EXPERIMENT, dataclasses.asdict(config), metrics_out,
                          [], seconds, rows=rows)
    plots.save_scatter(run.workdir / "curvature.png", panels,
                       title="diagonal second derivatives, one point per parameter")
    columns = ["net", "layer", "param", "mean_backpropagated", "mean_gauss_newton",
               "mean_hessian", "backpropagated_vs_gauss_newton", "gauss_newton_vs_hessian"]
    results.save_and_print_table(run.workdir, results.markdown_table(rows, columns)
                                 + f"\nResults in {run.workdir}\n")
    return metrics_out


if __name__ == "__main__":
    run_main(main, EXPERIMENT)
