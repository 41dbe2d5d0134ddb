"""Where the time of a training step goes, layer by layer: the hand-written backward beside
jax's, for every layer of the benchmark's models.

    python -m experiments.layer_profile [--workdir DIR] [--models lenet5,mlp,...]
        [--size full|smallest] [--batch 0] [--repeats 10] [--seed 0]

For each model of the bench's engine family (`experiments.bench`, at its sizes: the MLP
784-1024-1024-10 (also with a BatchNorm before each ReLU) and the residual MLP at batch 256,
LeNet-1989 at batch 64, LeNet-5 at batch 128, the 2-block transformer at batch 32, the LSTM
and GRU of its rnn family: hidden 256, 100 steps, batch 64) and AlexNet (two towers,
227x227x3, batch 2; 10 classes), each top-level layer is run on its own input (the previous
layer's output at a random batch) and a random dE/dy of its output's shape, and three jitted
functions are timed, compile apart (`training.benchmark`):

  forward             layer.apply(params, x);
  manual backward     layer.backward(params, residuals, dy) -> (dparams, dx), the residuals
                      being those of layer.forward;
  autodiff backward   the pullback of jax.vjp(layer.apply, params, x) applied to dy (the pullback
                      is a pytree of jax's residuals, passed to the jitted call as an argument).

`parameters` (free) and `macs` (multiply-adds of the whole batch's forward) are
`nets.count_model`'s, and `forward_gflops` the forward's rate, 2 macs / forward_s (None
without multiply-adds). The two
backwards are timed alternately in one process; `ratio` is manual over autodiff. Both
give dparams and dx (dx not for token ids), and `max_rel_err` is the largest relative error
between their results (norm ratios per tensor; float32), so a fast but wrong backward shows.
`manual_residual_bytes` is what layer.forward keeps for the backward; `autodiff_residual_bytes`
what jax's pullback keeps, less the parameters it holds (the manual backward is handed them).
Per model, the layers' sums, and the whole step (value and gradient of the objective) with
each engine, timed alternately as the bench does: the difference from the sum is what XLA
gains by compiling the layers together, and the objective.

Measured on the 2-core CPU (jax 0.10.2, 2026-12-04, the first five models in 62 s, all eight
in 2 min 13 s (BENCHMARKS.md); `jit(a @ b)` about 140 GFLOP/s that
hour): manual over jax's backward summed over the layers, MLP 1.00, LeNet-1989 0.73 (H2 0.66),
LeNet-5 1.02 (layers 0.63-1.15), residual MLP 1.00, transformer 0.92 (attention 0.81-0.84);
the whole steps 0.98, 0.89, 0.94, 1.04 and 0.81; largest relative error 5.0e-7. Activations
keep half of jax's residuals, attention 0.58 of them, convolutions 1.14-1.17x. AlexNet (56 s
alone) showed its LRN's backward at 7x jax's (3.0 against 0.43 ms for conv1's) and its grouped
convolutions' backwards at 28-82 ms (XLA:CPU's grouped convolutions); both since fixed
(nets.LocalResponseNorm, nets.conv._group_by_group): the layers 0.93, the step 0.87, the
manual step 302 -> 181 ms. The LSTM and GRU layers (their BPTT against jax's pullback of
the scan): 0.89 and 0.89, residuals 52.0 against 77.6 MB and 32.8 against 59.3 MB; their
whole steps 0.82 and 0.76. The MLP with BatchNorm (2026-12-05, 11 s with the plain MLP): each
BatchNorm's backward 0.88 and 0.93 of jax's (0.52 and 0.57 ms), keeping 1,028 KB against
2,064 KB of residuals; the layers 1.00, the whole step 0.90.

Writes results.json ("layers": one row per layer; "models": the sums and the whole steps),
results.md and layer_profile.png (per model, the two backwards' times per layer).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

import nets
from experiments import bench
from nets.gradcheck import relative_error
from training import benchmark, logbook, plots, results
from training.config import option, parse, run_main
from training.harness import open_run

EXPERIMENT = "layer_profile"

MODELS = ("mlp", "mlp_batchnorm", "lenet1989", "lenet5", "residual_mlp", "transformer",
          "alexnet", "lstm", "gru", "gru_reset_after")


@dataclasses.dataclass(frozen=True)
class Config:
    models: tuple[str, ...] = option((), "comma-separated models to profile (default: all)",
                                     choices=MODELS)
    size: str = option("full", "full: the bench's sizes; smallest: tiny sizes for smoke tests",
                       choices=("full", "smallest"))
    batch: int = option(0, "examples per batch for every model (0: each model's own); e.g. "
                           "one device's share of a data-parallel step", ge=0)
    repeats: int = option(10, "timed samples of each function", ge=1)
    seed: int = option(0, "seed of the parameters, the batch and the dE/dy", ge=0)


def alexnet_case(smallest: bool):
    """AlexNet in two towers with 10 classes (the bench's random problems have 10): at full
    size (227x227x3) batch 2, or at the smallest size its strides allow (67x67x3) batch 1."""
    side, batch = (67, 1) if smallest else (227, 2)
    return (f"alexnet_{side}x{side}/b{batch}", nets.models.alexnet(num_classes=10),
            nets.Objective(nets.softmax_cross_entropy(), 0.0), (side, side, 3), batch)


def recurrent_case(kind: str, sizes: bench.Sizes):
    """The bench's rnn family model: one `kind` layer of its hidden size over its steps of
    RNN_INPUTS features, the last step projected to RNN_OUTPUTS (10), mean squared error."""
    batch, steps, hidden = sizes.rnn
    model = nets.recurrent.sequence_model([nets.recurrent.make_cell(kind, hidden)],
                                          bench.RNN_OUTPUTS, last_step=True)
    return (f"{kind}_h{hidden}_t{steps}/b{batch}", model,
            nets.Objective(nets.mean_squared_error(), 0.0), (steps, bench.RNN_INPUTS), batch)


def model_cases(sizes: bench.Sizes) -> dict:
    """{name in MODELS: (label, model, objective, input shape, batch)}: the bench's engine
    cases, LeNet-1989 at its largest batch, `alexnet_case` and the rnn family's LSTM and
    GRUs (`recurrent_case`)."""
    cases = bench.engine_cases(sizes)
    lenet1989 = max((c for c in cases if c[0].startswith("lenet1989/")), key=lambda c: c[4])
    pick = {"mlp": "mlp_", "lenet5": "lenet5/", "residual_mlp": "residual_mlp_",
            "transformer": "transformer_"}
    chosen = {name: next(c for c in cases if c[0].startswith(prefix))
              for name, prefix in pick.items()}
    chosen["mlp_batchnorm"] = next(c for c in cases if "_batchnorm/" in c[0])
    return {**chosen, "lenet1989": lenet1989, "alexnet": alexnet_case(sizes == bench.SMALLEST),
            **{kind: recurrent_case(kind, sizes) for kind in ("lstm", "gru", "gru_reset_after")}}


def with_batch(case, batch: int):
    """The case at another batch size, its label saying so."""
    label, model, objective, input_shape, _ = case
    return (f"{label.rsplit('/b', 1)[0]}/b{batch}", model, objective, input_shape, batch)


def _nbytes(tree, excluding=()) -> int:
    skip = {id(leaf) for leaf in jax.tree.leaves(excluding)}
    return sum(int(leaf.size) * leaf.dtype.itemsize for leaf in jax.tree.leaves(tree)
               if id(leaf) not in skip)


def _largest_relative_error(manual, autodiff) -> float:
    if jax.tree.structure(manual) != jax.tree.structure(autodiff):
        raise ValueError(f"layer_profile: the hand-written backward returned "
                         f"{jax.tree.structure(manual)}, jax's pullback "
                         f"{jax.tree.structure(autodiff)}")
    return max((relative_error(np.asarray(a, np.float64), np.asarray(b, np.float64))
                for a, b in zip(jax.tree.leaves(manual), jax.tree.leaves(autodiff))),
               default=0.0)


def profile_layer(layer: nets.Layer, params, x, dy, repeats: int) -> dict:
    """One row: the three functions of the module docstring timed on (params, x, dy)."""
    floating_input = jnp.issubdtype(x.dtype, jnp.floating)
    forward, forward_compile = benchmark.compile_jitted(layer.apply, params, x)
    forward_time = benchmark.time_calls(forward, (params, x), repeats, compile_s=forward_compile)
    y, residuals = jax.jit(layer.forward)(params, x)
    manual, manual_compile = benchmark.compile_jitted(layer.backward, params, residuals, dy)
    if floating_input:
        _, pullback = jax.vjp(layer.apply, params, x)
    else:
        _, pullback = jax.vjp(lambda p: layer.apply(p, x), params)

    def pull(pullback, dy):
        return pullback(dy)

    autodiff, autodiff_compile = benchmark.compile_jitted(pull, pullback, dy)
    manual_time, autodiff_time = benchmark.compare(manual, (params, residuals, dy), autodiff,
                                                   (pullback, dy), repeats)
    dparams, dx = manual(params, residuals, dy)
    expected = autodiff(pullback, dy)
    error = _largest_relative_error((dparams, dx) if floating_input else (dparams,), expected)
    counted = nets.count_model(layer, (-1, *x.shape[1:]))
    return {
        "layer": layer.name,
        "input_shape": list(x.shape), "output_shape": list(y.shape),
        "parameters": counted.params, "macs": counted.macs * x.shape[0],
        "forward_gflops": (2e-9 * counted.macs * x.shape[0] / forward_time.median_s
                           if counted.macs else None),
        "forward_s": forward_time.median_s,
        "manual_backward_s": manual_time.median_s,
        "autodiff_backward_s": autodiff_time.median_s,
        "ratio": manual_time.median_s / autodiff_time.median_s,
        "manual_p10_s": manual_time.p10_s, "manual_p90_s": manual_time.p90_s,
        "autodiff_p10_s": autodiff_time.p10_s, "autodiff_p90_s": autodiff_time.p90_s,
        "compile_s": {"forward": forward_compile, "manual": manual_compile,
                      "autodiff": autodiff_compile},
        "manual_residual_bytes": _nbytes(residuals),
        "autodiff_residual_bytes": _nbytes(pullback, excluding=params),
        "max_rel_err": error,
    }


def whole_steps(model, objective, params, x, targets, repeats: int) -> dict:
    """The value and gradient of the objective with each engine, timed alternately."""
    functions = [benchmark.compile_jitted(nets.get_engine(name)(model, objective), params, x,
                                          targets) for name in ("manual", "autodiff")]
    (manual, manual_compile), (autodiff, autodiff_compile) = functions
    args = (params, x, targets)
    manual_time, autodiff_time = benchmark.compare(manual, args, autodiff, args, repeats)
    return {"step_manual_s": manual_time.median_s, "step_autodiff_s": autodiff_time.median_s,
            "step_ratio": manual_time.median_s / autodiff_time.median_s,
            "step_compile_s": {"manual": manual_compile, "autodiff": autodiff_compile}}


def profile_model(name: str, case, seed: int, repeats: int,
                  layer_done=lambda: None) -> tuple[list, dict]:
    """(one row per top-level layer, the model's totals); `layer_done()` after each layer."""
    label, model, objective, input_shape, batch = case
    key = jax.random.key(seed)
    params, x, targets = bench.random_problem(model, input_shape, batch, key)
    inputs = [x] + jax.jit(lambda p, x: [y for _, y in nets.layer_outputs(model, p, x)])(
        params, x)
    rows = []
    for index, (layer, layer_params) in enumerate(zip(model.sublayers, params)):
        y = inputs[index + 1]
        dy = jax.random.normal(jax.random.fold_in(key, 100 + index), y.shape, y.dtype)
        row = profile_layer(layer, layer_params, inputs[index], dy, repeats)
        rows.append({"model": name, "case": label, "index": index, **row})
        layer_done()
    totals = {"model": name, "case": label, "layers": len(rows),
              **{f"sum_{key}": sum(r[key] for r in rows)
                 for key in ("forward_s", "manual_backward_s", "autodiff_backward_s",
                             "manual_residual_bytes", "autodiff_residual_bytes")},
              **whole_steps(model, objective, params, x, targets, repeats)}
    totals["sum_ratio"] = totals["sum_manual_backward_s"] / totals["sum_autodiff_backward_s"]
    return rows, totals


def plot_panels(rows: list[dict], models: list[str]) -> list[dict]:
    panels = []
    for name in models:
        mine = [r for r in rows if r["model"] == name]
        panels.append({"title": mine[0]["case"], "log": True, "ylabel": "seconds (median)",
                       "groups": [r["layer"] for r in mine],
                       "series": {"forward": [r["forward_s"] for r in mine],
                                  "manual backward": [r["manual_backward_s"] for r in mine],
                                  "jax.vjp backward": [r["autodiff_backward_s"] for r in mine]}})
    return panels


def render(rows: list[dict], totals: list[dict], workdir) -> str:
    def ms(seconds):
        return round(seconds * 1e3, 4)

    layer_rows = [{"model": r["model"], "layer": r["layer"],
                   "input": "x".join(map(str, r["input_shape"])),
                   "forward ms": ms(r["forward_s"]),
                   "fwd GFLOP/s": (None if r["forward_gflops"] is None
                                   else round(r["forward_gflops"], 1)),
                   "manual bwd ms": ms(r["manual_backward_s"]),
                   "jax.vjp bwd ms": ms(r["autodiff_backward_s"]),
                   "manual/jax": round(r["ratio"], 3),
                   "residual KB manual / jax": f"{r['manual_residual_bytes'] / 1024:.1f} / "
                                               f"{r['autodiff_residual_bytes'] / 1024:.1f}",
                   "max rel err": f"{r['max_rel_err']:.1e}"} for r in rows]
    total_rows = [{"model": t["case"], "layers' forward ms": ms(t["sum_forward_s"]),
                   "layers' manual bwd ms": ms(t["sum_manual_backward_s"]),
                   "layers' jax.vjp bwd ms": ms(t["sum_autodiff_backward_s"]),
                   "layers' manual/jax": round(t["sum_ratio"], 3),
                   "step manual ms": ms(t["step_manual_s"]),
                   "step jax.grad ms": ms(t["step_autodiff_s"]),
                   "step manual/jax": round(t["step_ratio"], 3)} for t in totals]
    return ("Per layer (medians; the two backwards timed alternately):\n\n"
            + results.markdown_table(layer_rows)
            + "\nPer model: the layers' sums, and the whole value-and-gradient step:\n\n"
            + results.markdown_table(total_rows) + f"\nResults in {workdir}\n")


def main(argv=None):
    config, args = parse(Config, argv, __doc__, prog=f"python -m experiments.{EXPERIMENT}")
    run = open_run(EXPERIMENT, config, args, compilation_cache=False)
    cases = model_cases(bench.SMALLEST if config.size == "smallest" else bench.Sizes())
    if config.batch:
        cases = {name: with_batch(case, config.batch) for name, case in cases.items()}
    names = [name for name in MODELS if not config.models or name in config.models]
    rows, totals = [], []
    bar = (tqdm(total=sum(len(cases[name][1].sublayers) for name in names), unit="layer")
           if logbook.interactive() else None)
    for name in names:
        if bar is None:
            print(f"layer_profile: {name} ...", flush=True)
        else:
            bar.set_description(name)
        model_rows, model_totals = profile_model(name, cases[name], config.seed, config.repeats,
                                                 (lambda: None) if bar is None else bar.update)
        rows += model_rows
        totals.append(model_totals)
    if bar is not None:
        bar.close()
    metrics_out = {
        "layers": len(rows),
        "max_rel_err": max(r["max_rel_err"] for r in rows),
        "layers_manual_faster": sum(r["ratio"] < 1 for r in rows),
        "sum_ratio": {t["model"]: t["sum_ratio"] for t in totals},
        "step_ratio": {t["model"]: t["step_ratio"] for t in totals},
    }
    results.write_results(run.workdir, EXPERIMENT, dataclasses.asdict(config), metrics_out, [],
                          {"compile": sum(sum(r["compile_s"].values()) for r in rows)},
                          layers=rows, models=totals, threads=benchmark.thread_settings(),
                          device=bench.device_name())
    plots.save_grouped_bars(run.workdir / "layer_profile.png", plot_panels(rows, names),
                            title="per layer: forward and the two backwards")
    results.save_and_print_table(run.workdir, render(rows, totals, run.workdir))
    return metrics_out


if __name__ == "__main__":
    run_main(main, EXPERIMENT)
