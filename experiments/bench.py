"""The benchmark suite: every speed claim beside its reference, measured in one process.

    python -m experiments.bench [--quick] [--families engine,recipe,lenet5_torch,...]
    make bench

Families (targets from the issue; "ratio" is always this codebase / its reference, measured
in this process, interleaved A B A B, after warm-up; compile time reported apart):
  engine        manual engine / autodiff engine, one jitted SGD step: MLP 784-1024-1024-10
                (batch 256) and the same with a BatchNorm before each ReLU, LeNet-1989
                (batch 1 and 64), LeNet-5 (batch 128), and a pre-norm residual MLP with
                LayerNorm (`nets.residual_mlp`: 784, two blocks of 1024, 10; batch 256).
                Target <= 1.0, and no more temporary memory (XLA's memory analysis of each
                compiled step). Also, with no target: eight Dense-tanh-Dense-tanh blocks
                (width 256, batch 4096) each in `nets.remat` against the same unwrapped,
                time and temporaries; the MLP at batch 4096 as 8 micro-batches
                (`nets.accumulated`) against the whole batch at once, likewise; one
                Gauss-Newton product G v by hand against jax's jvp-then-vjp (the MLP,
                LeNet-5, the transformer) and one exact Hessian product H v by hand
                (Pearlmutter's R-operator) against jax's jvp of grad (the same three).
  conv          each Conv2D implementation ("conv", "patches", "gather", "rows", "tiles")
                against the model's default, one jitted SGD step with the manual engine:
                LeNet-5 (batch 128; default "tiles") and LeNet-1989 (batch 1; default
                "gather"). No target: the evidence for each model's default.
  recipe        LeNet-1989's 1989 recipe (one-example SGD in a constant order over the 7,291
                USPS digits; 23 passes, 1 with --quick), wall time including compilation,
                against PyTorch eager running the same recipe from the same initial weights,
                each side computing the mean E over the digits after every pass
                (energy_after of both rows: the last). Target: >= 60x faster.
  lenet5_torch  LeNet-5 batch-128 training step against PyTorch eager holding the same
                parameters. Target <= 0.8.
                Every PyTorch reference holds our parameters, and before it is timed the
                bench checks that its loss and gradients equal ours within float32's 1e-5
                (the recipe: at the first digit), recording torch_loss_rel_err and
                torch_grad_rel_err; a larger difference stops the bench (ValueError).
  per_example   vmap per-example gradient step / batch-gradient step (MLP, LeNet-5 at batch
                128; targets <= 2 and <= 4), and a Python loop over examples / vmap (>= 10).
                Also each model's DP-SGD step (`parallel.private_value_and_grad`) by ghost
                norms against the same step by vmap, and against the batch step, and
                `parallel.pick_hardest_misclassified` by ghost norms against vmap (no
                targets). Every step takes each model's default (LeNet-5's "tiles").
  utilisation   MLP training FLOP/s over the FLOP/s of jit(a @ b) measured in the same run
                (float32, width 1024, batch 256). Target >= 0.6 on CPU. On a GPU also in
                bfloat16 (params, inputs and the matmul; --utilisation-dtypes): >= 0.5, and
                also at width 8192, batch 8192 (the issue's product is too small there).
  rnn           Elman, LSTM, GRU (Cho et al.'s) and the reset-after GRU (batch 64, T 100,
                hidden 256, 32 inputs, a Dense readout of the last step, MSE): manual BPTT /
                jax.grad step (target <= 1.0); each one's Gauss-Newton product G v by hand
                (a tangent scan, then BPTT) against jax's jvp-then-vjp and its exact Hessian
                product H v (a tangent scan, then BPTT's R-operator) against jax's jvp of
                grad (no target); the
                LSTM's `unroll` sweep 1, 2, 4, 8, 16
                (ratio to unroll 1); the LSTM with gradient checkpointing through time
                (`recompute_every` sqrt(T)) against every step's residuals kept, time and
                XLA's temporaries; the scan LSTM and reset-after GRU against PyTorch
                nn.LSTM / nn.GRU holding the same weights (`recurrent.to_pytorch`; target
                <= 1.0): the same function, checked before timing (loss and every gradient
                within float32's 1e-5, recorded as torch_loss_rel_err, torch_grad_rel_err).
                On a CPU also the scan LSTM against nn.LSTM with PyTorch's oneDNN backend off
                (its own LSTM kernels; no target): nn.LSTM runs oneDNN's fused LSTM there.
                Also each matrix product of one reset-after GRU time step alone (forward
                h W_h, backward da_h W_h^T, weight gradient h^T da_h), jitted against
                PyTorch's matmul (no target; `step_products`): the rate of either side at one
                step's sizes.
  On a CPU with several cores, lenet5_torch and rnn also time the same SGD step data-parallel
  over one JAX CPU device per core (`--cpu-devices`; `training.parallel.data_parallel`, form
  "shard_map": each device computes the gradient of its share of the batch on its own core,
  one all-reduce averages them) against PyTorch again: XLA:CPU spreads one small product
  over two cores poorly, PyTorch well, and a device per core gives each core its own work.
  scaling       device scaling (experiments.scaling in a subprocess, so that it can simulate 4
                CPU devices): the MLP's step time per data-parallel form at 1, 2, 4 devices,
                weak and strong, manual engine; ratio = parallel efficiency (speed-up over
                the number of devices; only p50 is measured there, p10/p90 are left empty).
PyTorch (`pip install torch==2.13.0`, the CPU build; the `bench` extra) is optional: without it
the PyTorch families are skipped with a note. When JAX runs on a GPU and the installed torch
sees CUDA, the PyTorch references run there too (cuDNN for nn.LSTM/nn.GRU), each timed call
ending in torch.cuda.synchronize(); rows record `torch_device`. Threads: XLA's and PyTorch's
intra-op pools are both left at the machine's core count, and recorded
(training.benchmark.thread_settings). Memory: glibc's malloc as it comes, unless
--reuse-memory (`training.benchmark.reuse_freed_memory`, for both sides): by default every
call of a step whose temporaries exceed 32 MB (the LSTM's 61 MB, the GRUs' 47.5 MB)
page-faults them in afresh, about 15% of those steps; nn.LSTM paid as much.

--quick times every target with 10 repetitions and one pass of the recipe, and leaves out the
rows without a target (the curvature products, remat, accumulation, recompute, the unroll
sweep, the per-step products, DP-SGD and picking; `--untargeted on` keeps them): 2 min 16 s
on the 2-core AMD EPYC host of 2026-12-07, where with them it took 5 min 50 s.

Writes results.json ({"benchmarks": [{"family", "name", "variant", "median_s", "p10_s",
"p90_s", "compile_s", "ratio", "ratio_of", "device", ...}], plus the README's keys, and
"seconds": the run's and each family's wall time), results.md and ratios.png. BENCHMARKS.md
at the top of the repository keeps the latest table per machine.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import sys
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

import nets
from nets.conv import IMPLEMENTATIONS
from nets.gradcheck import (
    TOLERANCES,
    astype,
    gauss_newton_product_reference,
    hessian_product_reference,
    relative_error,
)
from nets.models import lenet5, lenet1989
from training import benchmark, data, optim, parallel, plots, procedures, results
from training.config import ConfigError, option, parse, run_main
from training.harness import open_run

EXPERIMENT = "bench"
FAMILIES = ("engine", "conv", "recipe", "lenet5_torch", "per_example", "utilisation", "rnn",
            "scaling")
TARGETS = {"engine": ("<=", 1.0), "engine/remat": None, "engine/accumulate": None,
           "engine/gauss_newton": None, "engine/hessian": None,
           "recipe": ("<=", 1 / 60),
           "lenet5_torch": ("<=", 0.8),
           "rnn/engine": ("<=", 1.0), "rnn/torch": ("<=", 1.0), "rnn/gauss_newton": None,
           "rnn/hessian": None,
           "per_example/vmap_vs_batch/mlp": ("<=", 2.0),
           "per_example/vmap_vs_batch/lenet5": ("<=", 4.0),
           "per_example/loop_vs_vmap": (">=", 10.0), "utilisation": (">=", 0.6),
           "utilisation/bfloat16": (">=", 0.5)}


@dataclasses.dataclass(frozen=True)
class Config:
    quick: bool = option(False, "fewer repetitions and a 1-pass recipe: under 5 minutes on 2 "
                                "CPU cores")
    families: tuple[str, ...] = option(FAMILIES, "comma-separated families to run",
                                       choices=FAMILIES)
    repeats: int = option(20, "timed repetitions per measurement (--quick: 10)", ge=10)
    recipe_passes: int = option(23, "passes of the 1989 recipe (--quick: 1)", ge=1)
    seed: int = option(0, "seed of parameters and inputs", ge=0)
    size: str = option("full", "full: the issue's sizes; smallest: tiny sizes for smoke tests "
                       "(the ratios then mean little)", choices=("full", "smallest"))
    utilisation_dtypes: str = option("auto", "utilisation: auto (float32; plus bfloat16 on a "
                                             "GPU), float32, or float32,bfloat16",
                                     choices=("auto", "float32", "float32,bfloat16"))
    cpu_devices: int = option(0, "JAX CPU devices for the data-parallel rows, one a core: 0 "
                                 "= the core count, 1 = no such rows. Takes effect only "
                                 "before JAX starts (a process whose JAX has started keeps "
                                 "its devices; results.json records them)", ge=0)
    untargeted: str = option("auto", "the rows without a target (curvature products, remat, "
                                     "accumulation, recompute, unroll, per-step products, "
                                     "DP-SGD and picking): on, off, or auto (off with "
                                     "--quick, on otherwise)", choices=("auto", "on", "off"))
    reuse_memory: bool = option(False, "keep freed memory for reuse (glibc malloc, both "
                                       "sides: training.benchmark.reuse_freed_memory): no "
                                       "page faults for steps with over 32 MB of "
                                       "temporaries")


@dataclasses.dataclass(frozen=True)
class Sizes:
    mlp_width: int = 1024
    mlp_batch: int = 256
    lenet1989_batches: tuple[int, ...] = (1, 64)
    lenet5_batch: int = 128
    recipe_examples: int = 0  # 0: all 7,291 digits
    rnn: tuple[int, int, int] = (64, 100, 256)  # batch, time, hidden
    transformer: tuple[int, int, int] = (32, 64, 128)  # batch, context, features
    gpu_utilisation: tuple[int, int] = (8192, 8192)  # batch, width: utilisation_shapes


SMALLEST = Sizes(mlp_width=32, mlp_batch=8, lenet1989_batches=(1, 4), lenet5_batch=4,
                 recipe_examples=50, rnn=(4, 5, 8), transformer=(2, 4, 8),
                 gpu_utilisation=(16, 64))


def sizes_of(config) -> Sizes:
    return SMALLEST if config.size == "smallest" else Sizes()


def device_name() -> str:
    device = jax.devices()[0]
    return f"{device.platform}:{getattr(device, 'device_kind', '')}"


def row(family, name, variant, measurement, ratio=None, ratio_of=None, **extra):
    """One `benchmarks` entry."""
    return {"family": family, "name": name, "variant": variant,
            "median_s": measurement.median_s, "p10_s": measurement.p10_s,
            "p90_s": measurement.p90_s, "compile_s": measurement.compile_s,
            "repeats": measurement.repeats,
            "calls_per_sample": measurement.calls_per_sample, "ratio": ratio, "ratio_of": ratio_of,
            "device": device_name(), **extra}


# --- family: engine ------------------------------------------------------------------------

def sgd_step(model, objective, engine, lr=0.01):
    value_and_grad = engine(model, objective)

    def step(params, x, targets):
        energy, grad = value_and_grad(params, x, targets)
        return jax.tree.map(lambda w, g: w - lr * g, params, grad), energy

    return step


def request_cpu_devices(count: int) -> None:
    """Ask JAX for `count` CPU devices (0: one per core). Only possible before JAX starts; a
    process whose JAX has started (a test, an interactive session) keeps its devices."""
    try:
        jax.config.update("jax_num_cpu_devices", count or os.cpu_count() or 1)
    except RuntimeError:
        pass


def data_parallel_rows(family, name, model, objective, args, reference, repeats):
    """`sgd_step`'s update (lr 0.01) data-parallel over every CPU device, against `reference`
    = (variant, step, args, ratio_of) timed alternately with it. No rows off the CPU or with
    one device."""
    devices = len(jax.devices())
    if jax.default_backend() != "cpu" or devices < 2 or args[1].shape[0] % devices:
        return []
    optimizer = optax.sgd(0.01)
    run = parallel.data_parallel(model, objective, optimizer, form="shard_map")
    params, x, targets = args
    placed = (run.place_state(params), run.place_state(optimizer.init(params)),
              *run.place_batch(np.asarray(x), np.asarray(targets)))
    step, compile_s = benchmark.compile_jitted(run.step, *placed)
    reference_variant, reference_step, reference_args, ratio_of = reference
    ours, theirs = benchmark.compare(step, placed, reference_step, reference_args, repeats)
    ours.compile_s = compile_s
    return [row(family, name, f"jax_manual_data_parallel_{devices}_cpu_devices", ours,
                ours.median_s / theirs.median_s, ratio_of),
            row(family, name, f"{reference_variant}_beside_data_parallel", theirs)]


def mlp(sizes):
    """(name, the MLP 784-W-W-10 with ReLU), W = sizes.mlp_width."""
    return mlp_of_width(sizes.mlp_width)


def mlp_of_width(width):
    return (f"mlp_784_{width}_{width}_10",
            nets.build_mlp(784, 10, hidden_layers=2, hidden_units=width, activation="relu"))


def engine_cases(sizes):
    mse = nets.Objective(nets.mean_squared_error(), 0.0)
    softmax = nets.Objective(nets.softmax_cross_entropy(), 0.0)
    mlp_name, mlp_model = mlp(sizes)
    return [
        (f"{mlp_name}/b{sizes.mlp_batch}", mlp_model, softmax, (784,), sizes.mlp_batch),
        *[(f"lenet1989/b{batch}", lenet1989(), mse, (16, 16, 1), batch)
          for batch in sizes.lenet1989_batches],
        (f"lenet5/b{sizes.lenet5_batch}", lenet5(), softmax, (32, 32, 1), sizes.lenet5_batch),
        (f"{mlp_name}_batchnorm/b{sizes.mlp_batch}",
         nets.build_mlp(784, 10, hidden_layers=2, hidden_units=sizes.mlp_width,
                        activation="relu", batch_norm=True), softmax, (784,), sizes.mlp_batch),
        (f"residual_mlp_784_{sizes.mlp_width}x2_10/b{sizes.mlp_batch}",
         nets.residual_mlp(784, 10, width=sizes.mlp_width, blocks=2), softmax, (784,),
         sizes.mlp_batch),
        transformer_case(sizes),
    ]


@dataclasses.dataclass(frozen=True)
class TokenWindows:
    """The input of a language model: windows of `context` token ids of `vocabulary`."""
    context: int
    vocabulary: int


def transformer_case(sizes):
    """char_transformer's model (2 blocks, 4 heads, 65 characters) on windows of ids."""
    batch, context, features = sizes.transformer
    model = nets.transformer_lm(65, context, features, heads=min(4, features), blocks=2)
    return (f"transformer_2x{features}_ctx{context}/b{batch}", model,
            nets.Objective(nets.sequence_cross_entropy(), 0.0), TokenWindows(context, 65),
            batch)


def random_problem(model, input_shape, batch, key):
    """params, inputs (batch, *input_shape) and targets one-hot over 10 classes; for
    `TokenWindows` ids (batch, context) in and the next ids out. Drawn by one compiled
    program (op by op, a model's initialisation compiled each of its draws apart)."""
    return jax.jit(functools.partial(_random_problem, model, input_shape, batch))(key)


def _random_problem(model, input_shape, batch, key):
    label_key = jax.random.fold_in(key, 2)
    if isinstance(input_shape, TokenWindows):
        params = model.init(key, (-1, input_shape.context))[1]
        ids = jax.random.randint(label_key, (batch, input_shape.context + 1), 0,
                                 input_shape.vocabulary)
        return params, ids[:, :-1], ids[:, 1:]
    params = model.init(key, (-1, *input_shape))[1]
    x = jax.random.normal(jax.random.fold_in(key, 1), (batch, *input_shape), jnp.float32)
    labels = jax.random.randint(label_key, (batch,), 0, 10)
    return params, x, jax.nn.one_hot(labels, 10, dtype=jnp.float32)


def temp_bytes(compiled) -> int | None:
    try:
        return int(compiled.memory_analysis().temp_size_in_bytes)
    except (AttributeError, TypeError, NotImplementedError):
        return None


def memory_extras(manual_fn, auto_fn) -> dict:
    """temp_bytes of the manual step and temp_ratio, its temporaries over jax.grad's (the
    engine target: no more temporary memory); None where XLA reports no memory analysis."""
    manual, auto = temp_bytes(manual_fn), temp_bytes(auto_fn)
    ratio = manual / auto if manual is not None and auto else None
    return {"temp_bytes": manual, "temp_ratio": ratio}


def untargeted_rows(config) -> bool:
    """Whether the families also time their rows without a target (`--untargeted`): --quick
    leaves them out unless asked, so that it times every target in under 5 minutes."""
    return config.untargeted == "on" or (config.untargeted == "auto" and not config.quick)


def family_engine(config, key):
    for name, model, objective, input_shape, batch in engine_cases(sizes_of(config)):
        args = random_problem(model, input_shape, batch, key)
        compiled = {}
        for engine_name in ("manual", "autodiff"):
            step = sgd_step(model, objective, nets.get_engine(engine_name))
            compiled[engine_name] = benchmark.compile_jitted(step, *args)
        (manual_fn, manual_compile), (auto_fn, auto_compile) = compiled["manual"], compiled[
            "autodiff"]
        manual, auto = benchmark.compare(manual_fn, args, auto_fn, args, config.repeats)
        manual.compile_s, auto.compile_s = manual_compile, auto_compile
        yield row("engine", name, "manual", manual, manual.median_s / auto.median_s,
                  "manual/autodiff", **memory_extras(manual_fn, auto_fn))
        yield row("engine", name, "autodiff", auto, temp_bytes=temp_bytes(auto_fn))
    if untargeted_rows(config):
        yield from remat_rows(sizes_of(config), key, config.repeats)
        yield from accumulation_rows(sizes_of(config), key, config.repeats)
        yield from gauss_newton_rows(sizes_of(config), key, config.repeats)


REMAT_BLOCKS = 8


def remat_blocks_model(width, wrap):
    """REMAT_BLOCKS blocks Dense-tanh-Dense-tanh of `width` (each in `nets.remat` when wrap)
    and a Dense readout of 10."""
    def block():
        made = nets.serial(nets.Dense(width), nets.Tanh(), nets.Dense(width), nets.Tanh())
        return nets.remat(made) if wrap else made

    return nets.serial(*(block() for _ in range(REMAT_BLOCKS)), nets.Dense(10))


ACCUMULATED_PARTS = 8


def accumulation_rows(sizes, key, repeats):
    """The MLP's manual step at batch 16 mlp_batch as ACCUMULATED_PARTS micro-batches
    (`nets.accumulated`) against the whole batch at once, alternated: time and XLA's
    temporaries. No target."""
    name, model = mlp(sizes)
    batch = 16 * sizes.mlp_batch
    softmax = nets.Objective(nets.softmax_cross_entropy(), 0.0)
    args = random_problem(model, (784,), batch, key)
    engines = (nets.accumulated(nets.manual, ACCUMULATED_PARTS), nets.manual)
    (parts_fn, parts_compile), (whole_fn, whole_compile) = [
        benchmark.compile_jitted(sgd_step(model, softmax, engine), *args) for engine in engines]
    parts, whole = benchmark.compare(parts_fn, args, whole_fn, args, repeats)
    parts.compile_s, whole.compile_s = parts_compile, whole_compile
    row_name = f"accumulate/{name}/b{batch}"
    yield row("engine", row_name, f"{ACCUMULATED_PARTS}_micro_batches", parts,
              parts.median_s / whole.median_s, "micro_batches/whole_batch",
              temp_bytes=temp_bytes(parts_fn))
    yield row("engine", row_name, "whole_batch", whole, temp_bytes=temp_bytes(whole_fn))


GAUSS_NEWTON_MODELS = ("mlp", "lenet5", "transformer")


def gauss_newton_rows(sizes, key, repeats):
    """One Gauss-Newton product G v by hand (`nets.engines.gauss_newton_product`: tangent
    passes, the loss's Hessian, backward passes) against jax's (`nets.gradcheck.
    gauss_newton_product_reference`: jvp, jvp of the loss's grad, vjp), alternated, for the
    MLP, LeNet-5 and the transformer of the engine rows, and for each one exact Hessian
    product H v by hand (`nets.engines.hessian_product`, the R-operator) against jax's jvp
    of grad. v random. No target."""
    for name, model, objective, input_shape, batch in engine_cases(sizes):
        if not name.startswith(GAUSS_NEWTON_MODELS) or "batchnorm" in name:
            continue
        args = random_problem(model, input_shape, batch, key)
        yield from gauss_newton_pair("engine", name, model, objective, args, key, repeats)
        if model.backward_tangent is not None:
            yield from product_pair("engine", f"hessian/{name}", model, objective, args, key,
                                    repeats, (nets.engines.hessian_product,
                                              hessian_product_reference))


def gauss_newton_pair(family, name, model, objective, args, key, repeats):
    """The rows `gauss_newton/{name}` of `family`: G v by hand and by jax at (params, x,
    targets) = args for a random v, alternated."""
    yield from product_pair(family, f"gauss_newton/{name}", model, objective, args, key,
                            repeats, (nets.engines.gauss_newton_product,
                                      gauss_newton_product_reference))


def product_pair(family, name, model, objective, args, key, repeats, products):
    """The rows `{name}` of `family`: a curvature product by hand and by jax, `products` =
    (manual, reference), each `(model, objective) -> (params, x, targets, v) -> like
    params`, at (params, x, targets) = args for a random v, alternated."""

    @jax.jit
    def direction(params, key):
        leaves, structure = jax.tree.flatten(params)
        keys = jax.random.split(jax.random.fold_in(key, 3), len(leaves))
        return jax.tree.unflatten(structure, [jax.random.normal(leaf_key, leaf.shape, leaf.dtype)
                                              for leaf_key, leaf in zip(keys, leaves)])

    args = (*args, direction(args[0], key))
    (manual_fn, manual_compile), (jax_fn, jax_compile) = [
        benchmark.compile_jitted(product(model, objective), *args) for product in products]
    manual, reference = benchmark.compare(manual_fn, args, jax_fn, args, repeats)
    manual.compile_s, reference.compile_s = manual_compile, jax_compile
    yield row(family, name, "manual", manual, manual.median_s / reference.median_s,
              "manual/jax", **memory_extras(manual_fn, jax_fn))
    yield row(family, name, "jax", reference, temp_bytes=temp_bytes(jax_fn))


def remat_rows(sizes, key, repeats):
    """The manual step of REMAT_BLOCKS blocks each in `nets.remat` against the same blocks
    unwrapped, alternated (width mlp_width / 4, batch 16 mlp_batch: activations that
    outweigh the params): time and XLA's temporaries. No target."""
    width, batch = sizes.mlp_width // 4, 16 * sizes.mlp_batch
    mse = nets.Objective(nets.mean_squared_error(), 0.0)
    args = random_problem(remat_blocks_model(width, False), (width,), batch, key)
    steps = [benchmark.compile_jitted(sgd_step(remat_blocks_model(width, wrap), mse,
                                               nets.manual), *args) for wrap in (True, False)]
    (remat_fn, remat_compile), (plain_fn, plain_compile) = steps
    wrapped, plain = benchmark.compare(remat_fn, args, plain_fn, args, repeats)
    wrapped.compile_s, plain.compile_s = remat_compile, plain_compile
    name = f"remat/{REMAT_BLOCKS}_blocks_{width}/b{batch}"
    yield row("engine", name, "remat", wrapped, wrapped.median_s / plain.median_s,
              "remat/plain", temp_bytes=temp_bytes(remat_fn))
    yield row("engine", name, "plain", plain, temp_bytes=temp_bytes(plain_fn))


# --- family: convolution implementations --------------------------------------------------

def conv_cases(sizes):
    """(name, model factory, its default implementation, objective, input shape, batch)."""
    return [(f"lenet5/b{sizes.lenet5_batch}", lambda implementation: lenet5(
                implementation=implementation), "tiles",
             nets.Objective(nets.softmax_cross_entropy(), 0.0), (32, 32, 1), sizes.lenet5_batch),
            ("lenet1989/b1", lambda implementation: lenet1989(implementation=implementation),
             "gather", nets.Objective(nets.mean_squared_error(), 0.0), (16, 16, 1), 1)]


def family_conv(config, key):
    for name, build, default, objective, input_shape, batch in conv_cases(sizes_of(config)):
        args = random_problem(build(default), input_shape, batch, key)
        base_fn, base_compile = benchmark.compile_jitted(
            sgd_step(build(default), objective, nets.manual), *args)
        alone = benchmark.time_calls(base_fn, args, config.repeats, compile_s=base_compile)
        yield row("conv", name, default, alone, note="the model's default")
        for implementation in (i for i in IMPLEMENTATIONS if i != default):
            step, compile_s = benchmark.compile_jitted(
                sgd_step(build(implementation), objective, nets.manual), *args)
            other, base = benchmark.compare(step, args, base_fn, args, config.repeats)
            other.compile_s = compile_s
            yield row("conv", name, implementation, other, other.median_s / base.median_s,
                      f"{implementation}/{default}", reference_median_s=base.median_s)


# --- family: recipe (LeNet-1989, 1989 SGD) ------------------------------------------------

def usps_recipe_data(examples):
    images, labels = data.load_usps("train")
    images, labels = (images[:examples], labels[:examples]) if examples else (images, labels)
    return images.reshape(-1, 16, 16, 1), 2 * data.one_hot(labels, 10) - 1


def jax_recipe(images, targets, passes, seed):
    """Wall time of `passes` passes of one-example SGD (eta 0.006), compilation included.

    Without the procedures' non-finite guard (guard=None), as PyTorch's loop has none: the
    guard's checks took 0.1 s of each 0.38 s pass (`training.procedures`). The procedure
    records E over the whole set after every pass (about 0.05 s of a 0.26 s pass), and so
    does `torch_recipe` (until 2026-12-07 it computed E once, at the end). Initialisation and
    the first E are jitted (eager, they took 3.3 s, op by op)."""
    start = time.perf_counter()
    model = lenet1989()
    objective = nets.Objective(nets.mean_squared_error(), 0.0)
    x, t = jnp.asarray(images), jnp.asarray(targets)
    procedure = procedures.stochastic_passes(model, objective, optim.gradient_descent(0.006),
                                             x, t, guard=None)
    state = jax.jit(procedure.init)(lenet1989_initial_params(seed), jax.random.key(seed + 1))
    one_pass = jax.jit(lambda s, i: procedures.run_steps(procedure, s, i, 1))
    for index in range(passes):
        state, records = one_pass(state, jnp.int32(index))
    jax.block_until_ready(state)
    return time.perf_counter() - start, float(records["energy"][-1])


def lenet1989_initial_params(seed):
    """The params both recipes start from. Compiled without optimisation: it runs once, and
    LLVM's optimisation of its random-number kernels took 1.1 of the 1.5 s that init took
    jitted (eager, 1.9 s)."""
    init = jax.jit(lambda key: lenet1989().init(key, (-1, 16, 16, 1))[1],
                   compiler_options={"xla_backend_optimization_level": 0})
    return init(jax.random.key(seed))


def lenet1989_to_torch(params) -> dict[str, np.ndarray]:
    """LeNet-1989 params (or their gradients) in torch_lenet1989's names and layouts: kernels
    HWIO -> OIHW, unshared biases (H, W, C) -> (C, H, W), H3's rows from our (h, w, c)
    flattening order to PyTorch's (c, h, w), Dense weights (in, out) -> (out, in)."""
    h1, _, h2, _, _, h3, _, out, _ = params

    def kernel(w):
        return np.asarray(w).transpose(3, 2, 0, 1).copy()

    def maps(b):
        return np.asarray(b).transpose(2, 0, 1).copy()

    w3 = np.asarray(h3["w"]).reshape(4, 4, 12, -1).transpose(2, 0, 1, 3).reshape(192, -1)
    return {"w1": kernel(h1["w"]), "b1": maps(h1["b"]), "w2": kernel(h2["w"]),
            "b2": maps(h2["b"]), "w3": w3.T.copy(), "b3": np.asarray(h3["b"]),
            "w4": np.asarray(out["w"]).T.copy(), "b4": np.asarray(out["b"])}


def torch_lenet1989(torch, params):
    """`lenet1989()` in PyTorch, holding its params (lenet1989_to_torch): -1 padding, stride-2
    5x5 convs, the H2 table as a mask, unshared biases, tanh everywhere. Returns (forward,
    the parameters by name)."""
    device = torch_device(torch)
    mask = torch.tensor(np.asarray(nets.lenet1989_h2_table(), np.float32).T,
                        device=device)[:, :, None, None]
    parameters = on_device(torch, {name: torch.tensor(np.asarray(array, np.float32))
                                   for name, array in lenet1989_to_torch(params).items()})
    functional = torch.nn.functional

    def forward(x):
        p = parameters
        h1 = torch.tanh(functional.conv2d(functional.pad(x, (2, 2, 2, 2), value=-1.0),
                                          p["w1"], stride=2) + p["b1"])
        h2 = torch.tanh(functional.conv2d(functional.pad(h1, (2, 2, 2, 2), value=-1.0),
                                          p["w2"] * mask, stride=2) + p["b2"])
        h3 = torch.tanh(h2.flatten(1) @ p["w3"].T + p["b3"])
        return torch.tanh(h3 @ p["w4"].T + p["b4"])

    return forward, parameters


def recipe_agreement(torch, params, images, targets):
    """The first example's loss and gradient at the recipe's initial params, PyTorch's against
    our manual engine's (`torch_agreement`)."""
    objective = nets.Objective(nets.mean_squared_error(), 0.0)
    value_and_grad = nets.manual(lenet1989(), objective)
    forward, parameters = torch_lenet1989(torch, params)
    x = torch.tensor(images[:1].transpose(0, 3, 1, 2).copy(), device=torch_device(torch))
    t = torch.tensor(np.asarray(targets[:1]), device=torch_device(torch))
    return torch_agreement(
        torch, "recipe",
        lambda: jax.jit(value_and_grad)(params, jnp.asarray(images[:1]),
                                        jnp.asarray(targets[:1])),
        lenet1989_to_torch, lambda x, t: 0.5 * torch.sum((forward(x) - t) ** 2), parameters,
        (x, t))


def on_device(torch, params):
    """Leaf tensors made on the CPU (seeded there), moved to `torch_device`, requiring grad."""
    device = torch_device(torch)
    return {name: p.detach().to(device).requires_grad_() for name, p in params.items()}


def torch_recipe(torch, images, targets, passes, params):
    """The recipe in PyTorch eager from `params` (ours, converted inside the timed span),
    with E over the whole set after every pass, as `jax_recipe`'s procedure records it."""
    start = time.perf_counter()
    forward, params = torch_lenet1989(torch, params)
    x = torch.tensor(images.transpose(0, 3, 1, 2).copy(), device=torch_device(torch))
    t = torch.tensor(np.asarray(targets), device=torch_device(torch))
    energies = []
    for _ in range(passes):
        for i in range(x.shape[0]):
            loss = 0.5 * torch.sum((forward(x[i:i + 1]) - t[i:i + 1]) ** 2)
            for p in params.values():
                p.grad = None
            loss.backward()
            with torch.no_grad():
                for p in params.values():
                    p -= 0.006 * p.grad
        with torch.no_grad():
            energies.append(0.5 * torch.sum((forward(x) - t) ** 2) / x.shape[0])
    energy = float(energies[-1])
    return time.perf_counter() - start, energy


def family_recipe(config, key, torch):
    images, targets = usps_recipe_data(sizes_of(config).recipe_examples)
    passes = 1 if config.quick else config.recipe_passes
    jax_seconds, jax_energy = jax_recipe(images, targets, passes, config.seed)
    measurement = benchmark.Measurement(jax_seconds, jax_seconds, jax_seconds, None, 1)
    name = f"lenet1989_recipe/{passes}_passes_of_{images.shape[0]}"
    if torch is None:
        return [row("recipe", name, "jax_manual", measurement, energy_after=jax_energy,
                    note="PyTorch absent: pip install torch==2.13.0 to compare")]
    params = lenet1989_initial_params(config.seed)
    agreement = recipe_agreement(torch, params, images, targets)
    torch_seconds, torch_energy = torch_recipe(torch, images, targets, passes, params)
    torch_measurement = benchmark.Measurement(torch_seconds, torch_seconds, torch_seconds,
                                              None, 1)
    return [row("recipe", name, "jax_manual", measurement, jax_seconds / torch_seconds,
                "jax/torch_eager", energy_after=jax_energy,
                note="wall time of the whole recipe, compilation included (one run)",
                torch_loss_rel_err=agreement["loss"],
                torch_grad_rel_err=agreement["gradients"]),
            row("recipe", name, "torch_eager", torch_measurement, energy_after=torch_energy,
                torch_device=torch_device(torch))]


# --- family: LeNet-5 against PyTorch -----------------------------------------------------

def lenet5_to_torch(params) -> dict[str, np.ndarray]:
    """LeNet-5 params (or their gradients) in torch_lenet5's names and layouts: kernels HWIO
    -> OIHW, Dense weights (in, out) -> (out, in); a linear map with no sharing, so it maps
    gradients too."""
    c1, _, s2, _, c3, _, s4, _, c5, _, _, f6, _, out = params

    def kernel(w):
        return np.asarray(w).transpose(3, 2, 0, 1).copy()

    def matrix(w):
        return np.asarray(w).T.copy()

    return {"c1": kernel(c1["w"]), "c1b": c1["b"], "s2": s2["w"], "s2b": s2["b"],
            "c3": kernel(c3["w"]), "c3b": c3["b"], "s4": s4["w"], "s4b": s4["b"],
            "c5": kernel(c5["w"]), "c5b": c5["b"], "f6": matrix(f6["w"]), "f6b": f6["b"],
            "out": matrix(out["w"]), "outb": out["b"]}


def torch_lenet5(torch, params):
    """`lenet5()` in PyTorch, holding its params (lenet5_to_torch): the same function, with
    the C3 table as a mask on the kernel and the trainable subsampling as 4 x average pooling
    times a coefficient plus a bias. Returns (loss(x, labels), the parameters by name)."""
    functional = torch.nn.functional
    table = torch.tensor(np.asarray(nets.lenet5_c3_table(), np.float32).T,
                         device=torch_device(torch))[:, :, None, None]
    parameters = on_device(torch, {name: torch.tensor(np.asarray(array)) for name, array
                                   in lenet5_to_torch(params).items()})

    def squash(a):
        return 1.7159 * torch.tanh(2 * a / 3)

    def subsample(x, coefficient, bias):
        return (functional.avg_pool2d(x, 2) * 4 * coefficient[None, :, None, None]
                + bias[None, :, None, None])

    def forward(x):
        p = parameters
        h = squash(functional.conv2d(x, p["c1"], p["c1b"]))
        h = squash(subsample(h, p["s2"], p["s2b"]))
        h = squash(functional.conv2d(h, p["c3"] * table, p["c3b"]))
        h = squash(subsample(h, p["s4"], p["s4b"]))
        h = squash(functional.conv2d(h, p["c5"], p["c5b"])).flatten(1)
        h = squash(h @ p["f6"].T + p["f6b"])
        return h @ p["out"].T + p["outb"]

    def loss(x, labels):
        return functional.cross_entropy(forward(x), labels)

    return loss, parameters


def torch_sgd_step(torch, loss, parameters, lr=0.01):
    """One SGD step of `loss` over `parameters` (a dict of leaf tensors), lr 0.01 like
    sgd_step; returns the loss."""
    def step(*args):
        value = loss(*args)
        for p in parameters.values():
            p.grad = None
        value.backward()
        with torch.no_grad():
            for p in parameters.values():
                p -= lr * p.grad
        return value

    return torch_synchronized(torch, step)


def torch_agreement(torch, what, ours, to_torch, loss, parameters, torch_args):
    """Relative errors (`relative_error`) between PyTorch's loss and gradients and ours
    (`ours()` -> (energy, grads), `to_torch` mapping the grads to PyTorch's names and layouts):
    {"loss": ..., "gradients": the largest over the parameters}. Both sides in full float32
    (JAX's matmul precision "highest", PyTorch's TF32 off), as a GPU's defaults may round
    products to TF32; above float32's tolerance of nets.gradcheck the two are not the same
    function, and the comparison is refused (ValueError naming `what`)."""
    with jax.default_matmul_precision("highest"):
        energy, grads = ours()
    with torch_full_float32(torch):
        value = loss(*torch_args)
        for p in parameters.values():
            p.grad = None
        value.backward()
    grads = to_torch(grads)
    errors = [relative_error(grads[name], p.grad.detach().cpu().numpy())
              for name, p in parameters.items()]
    agreement = {"loss": relative_error(energy, value.item()), "gradients": max(errors)}
    return same_function(what, agreement)


@contextlib.contextmanager
def torch_full_float32(torch):
    """PyTorch's CUDA products and convolutions in full float32 (no TF32) for the block."""
    backends = [torch.backends.cuda.matmul, torch.backends.cudnn]
    saved = [backend.allow_tf32 for backend in backends]
    try:
        for backend in backends:
            backend.allow_tf32 = False
        yield
    finally:
        for backend, allowed in zip(backends, saved):
            backend.allow_tf32 = allowed


def same_function(what, agreement):
    """`agreement` ({name: relative error}) if every error is within float32's tolerance
    (nets.gradcheck.TOLERANCES), else a ValueError naming `what`."""
    tolerance = TOLERANCES["float32"]["vs_autodiff"]
    if max(agreement.values()) > tolerance:
        raise ValueError(f"bench {what}: PyTorch's step and ours disagree (relative errors "
                         f"{agreement}, tolerance {tolerance}): they would not compute the "
                         "same function")
    return agreement


def family_lenet5_torch(config, key, torch):
    model = lenet5()
    objective = nets.Objective(nets.softmax_cross_entropy(), 0.0)
    batch = sizes_of(config).lenet5_batch
    name = f"lenet5/b{batch}"
    args = random_problem(model, (32, 32, 1), batch, key)
    step, compile_s = benchmark.compile_jitted(
        sgd_step(model, objective, nets.engines.manual), *args)
    if torch is None:
        return [row("lenet5_torch", name, "jax_manual",
                    benchmark.time_calls(step, args, config.repeats, compile_s=compile_s),
                    note="PyTorch absent: pip install torch==2.13.0 to compare")]
    loss, parameters = torch_lenet5(torch, args[0])
    x = torch.tensor(np.asarray(args[1]).transpose(0, 3, 1, 2).copy(),
                     device=torch_device(torch))
    labels = torch.tensor(np.asarray(jnp.argmax(args[2], axis=-1)), dtype=torch.long,
                          device=torch_device(torch))
    agreement = torch_agreement(torch, "lenet5_torch",
                                lambda: jax.jit(nets.engines.manual(model, objective))(*args),
                                lenet5_to_torch, loss, parameters, (x, labels))
    torch_step = torch_sgd_step(torch, loss, parameters)
    ours, theirs = benchmark.compare(step, args, torch_step, (x, labels), config.repeats)
    ours.compile_s = compile_s
    return [row("lenet5_torch", name, "jax_manual", ours,
                ours.median_s / theirs.median_s, "jax/torch_eager",
                torch_loss_rel_err=agreement["loss"],
                torch_grad_rel_err=agreement["gradients"]),
            row("lenet5_torch", name, "torch_eager", theirs, torch_device=torch_device(torch)),
            *data_parallel_rows("lenet5_torch", name, lenet5(), objective, args,
                                ("torch_eager", torch_step, (x, labels), "jax/torch_eager"),
                                config.repeats)]


# --- family: per-example gradients -------------------------------------------------------

def per_example_functions(model, objective):
    value_and_grad = nets.manual(model, objective)

    def per_example_step(params, x, targets, lr=0.01):
        grads = jax.vmap(lambda xi, ti: value_and_grad(params, xi[None], ti[None])[1])(
            x, targets)
        mean = jax.tree.map(lambda g: jnp.mean(g, axis=0), grads)
        return jax.tree.map(lambda w, g: w - lr * g, params, mean)

    def single_gradient(params, xi, ti):
        return value_and_grad(params, xi[None], ti[None])[1]

    return per_example_step, single_gradient


def per_example_compiler_options() -> dict[str, int]:
    """No autotuning of the vmapped per-example step on a GPU. On an H200 (jax 0.11.2,
    2026-12-04) XLA's autotuner did not finish compiling the MLP's step at batch 128 within
    35, 100 or 230 s (its per-example outer products fused into the mean's reduction; at
    batch 16 it compiled in 1.9 s); with XLA_FLAGS=--xla_gpu_autotune_level=0 it compiled in
    0.66-0.81 s and ran in 0.51 ms, against 0.88 ms for per-example gradients materialised
    (an optimization barrier before the mean) with autotuning. The batch step it is compared
    with keeps the default. (Which of XLA's autotuners stalls is not known; a similar report,
    large fusions and the Triton-or-native fusion autotuner: tue-bmd/zea issue 599.)"""
    return {"xla_gpu_autotune_level": 0} if jax.default_backend() == "gpu" else {}


def family_per_example(config, key):
    softmax = nets.Objective(nets.softmax_cross_entropy(), 0.0)
    sizes = sizes_of(config)
    batch = sizes.lenet5_batch
    mlp_model = mlp(sizes)[1]
    # Every step takes each model's default, LeNet-5's "tiles" convolutions: vmapped over
    # single examples they took 0.90 of the time of "patches" (2026-12-05), and "rows" had
    # made every example's band-matrix gradient (Wp / kw times dw's size) and the step 1.3x
    # slower.
    for name, model, input_shape in (("mlp", mlp_model, (784,)), ("lenet5", lenet5(), (32, 32, 1))):
        args = random_problem(model, input_shape, batch, key)
        announce(f"per_example/{name}: compiling the batch step")
        batch_step, batch_compile = benchmark.compile_jitted(
            lambda p, x, t, model=model: sgd_step(model, softmax, nets.manual)(p, x, t)[0],
            *args)
        per_example, single = per_example_functions(model, softmax)
        announce(f"per_example/{name}: compiling the vmapped per-example step")
        vmap_step, vmap_compile = benchmark.compile_jitted(
            per_example, *args, compiler_options=per_example_compiler_options())
        vmapped, batched = benchmark.compare(vmap_step, args, batch_step, args, config.repeats)
        vmapped.compile_s, batched.compile_s = vmap_compile, batch_compile
        yield row("per_example", f"vmap_vs_batch/{name}", "vmap_per_example", vmapped,
                  vmapped.median_s / batched.median_s, "vmap_per_example/batch")
        yield row("per_example", f"vmap_vs_batch/{name}", "batch", batched)
        announce(f"per_example/{name}: compiling one example's gradient")
        single_fn, _ = benchmark.compile_jitted(single, args[0], args[1][0], args[2][0])
        params, x, targets = args

        def python_loop(params, x, targets, single_fn=single_fn):
            return [single_fn(params, x[i], targets[i]) for i in range(x.shape[0])]

        loop, vmapped_again = benchmark.compare(python_loop, args, vmap_step, args,
                                                max(10, config.repeats // 2))
        yield row("per_example", f"loop_vs_vmap/{name}", "python_loop", loop,
                  loop.median_s / vmapped_again.median_s, "python_loop/vmap")
        if untargeted_rows(config):
            yield from dp_sgd_rows(name, model, softmax, args, batch_step, config.repeats)
            if name == "mlp":
                yield from pick_rows(model, softmax._replace(l2=1e-4), args)


def dp_sgd_rows(model_name, model, objective, args, batch_step, repeats):
    """The DP-SGD step (`parallel.private_value_and_grad`, C = 1, no noise, SGD lr 0.01) with
    each example's gradient formed by vmap against the same step by ghost norms (no target),
    and the ghost step against the plain batch step."""
    def private_step(per_example):
        value_and_grad = parallel.private_value_and_grad(model, objective, clip_norm=1.0,
                                                         per_example=per_example)

        def step(params, x, targets):
            return jax.tree.map(lambda w, g: w - 0.01 * g, params,
                                value_and_grad(params, x, targets)[1])

        return step

    name = f"dp_sgd/{model_name}/b{args[1].shape[0]}"
    ghost, rows = ghost_against_vmap(name, private_step, args)
    yield from rows
    ghost_again, batched = benchmark.compare(ghost, args, batch_step, args, repeats)
    yield row("per_example", f"{name}/vs_batch", "ghost_norms", ghost_again,
              ghost_again.median_s / batched.median_s, "ghost/batch")


def pick_rows(model, objective, args):
    """`parallel.pick_hardest_misclassified` (by gradient norm, the hardest eighth of the
    batch, lambda > 0 so that the norms carry the penalty's share) with the norms by ghost
    norms against the same pick with every example's gradient formed by vmap (no target)."""
    count = max(1, args[1].shape[0] // 8)

    def pick(per_example):
        return parallel.pick_hardest_misclassified(model, objective, count=count,
                                                   per_example=per_example)

    yield from ghost_against_vmap(f"pick_hardest/mlp/b{args[1].shape[0]}", pick, args)[1]


def ghost_against_vmap(name, make, args):
    """make("ghost") and make("vmap") compiled and timed alternately (10 samples): (the
    compiled ghost function, its row and the vmap row). The vmapped per-example gradients
    compile without XLA's GPU autotuner, as the vmapped step of `family_per_example`."""
    announce(f"per_example/{name}: compiling by ghost norms and by vmap")
    ghost, ghost_compile = benchmark.compile_jitted(make("ghost"), *args)
    vmapped, vmap_compile = benchmark.compile_jitted(
        make("vmap"), *args, compiler_options=per_example_compiler_options())
    ghost_m, vmap_m = benchmark.compare(ghost, args, vmapped, args, 10)
    ghost_m.compile_s, vmap_m.compile_s = ghost_compile, vmap_compile
    return ghost, [
        row("per_example", name, "ghost_norms", ghost_m, ghost_m.median_s / vmap_m.median_s,
            "ghost/vmap", temp_bytes=temp_bytes(ghost)),
        row("per_example", name, "vmap_per_example", vmap_m, temp_bytes=temp_bytes(vmapped))]


# --- family: utilisation -------------------------------------------------------------------

def utilisation_dtypes(config) -> tuple[str, ...]:
    """float32, plus bfloat16 on a GPU (the issue's GPU target), or as --utilisation-dtypes
    says."""
    if config.utilisation_dtypes != "auto":
        return tuple(config.utilisation_dtypes.split(","))
    return ("float32",) if jax.default_backend() == "cpu" else ("float32", "bfloat16")


def utilisation_shapes(sizes) -> list[tuple[int, int]]:
    """(batch, width) of the MLPs the utilisation family times: the issue's, and on a GPU also
    `sizes.gpu_utilisation`, whose products are large enough to reach the chip's rate (on an
    H200 the issue's 256x1024x1024 product took 87 us, 6.2 TFLOP/s: dispatch, not arithmetic)."""
    shapes = [(sizes.mlp_batch, sizes.mlp_width)]
    if jax.default_backend() != "cpu":
        shapes.append(sizes.gpu_utilisation)
    return shapes


def family_utilisation(config, key):
    objective = nets.Objective(nets.softmax_cross_entropy(), 0.0)
    for batch, width in utilisation_shapes(sizes_of(config)):
        name, model = mlp_of_width(width)
        layers = [(784, width), (width, width), (width, 10)]
        # forward 2 B n m per layer; backward 2 B n m for dW and 2 B n m for dx (the manual
        # backward computes dx of the first layer too, so count it)
        step_flops = sum(6 * batch * n * m for n, m in layers)
        for dtype in utilisation_dtypes(config):
            args = astype(random_problem(model, (784,), batch, key), dtype)
            step, compile_s = benchmark.compile_jitted(sgd_step(model, objective, nets.manual),
                                                       *args)
            a = jax.random.normal(key, (batch, width), dtype)
            b = jax.random.normal(jax.random.fold_in(key, 1), (width, width), dtype)
            matmul, _ = benchmark.compile_jitted(lambda a, b: a @ b, a, b)
            train, mm = benchmark.compare(step, args, matmul, (a, b), config.repeats)
            train.compile_s = compile_s
            train_rate = step_flops / train.median_s
            matmul_rate = 2 * batch * width * width / mm.median_s
            suffix = "" if dtype == "float32" else f"/{dtype}"
            yield row("utilisation", f"{name}/b{batch}{suffix}", "training_step", train,
                      train_rate / matmul_rate, "training_flops_per_s/matmul_flops_per_s",
                      flops_per_s=train_rate, dtype=dtype)
            yield row("utilisation", f"matmul_{batch}x{width}x{width}{suffix}", "jit(a@b)", mm,
                      flops_per_s=matmul_rate, dtype=dtype)


# --- family: recurrent nets ----------------------------------------------------------------

RNN_INPUTS, RNN_OUTPUTS = 32, 10


def rnn_problem(kind, sizes, key, unroll=1, recompute_every=None):
    from nets import recurrent

    batch, time_steps, hidden = sizes.rnn
    model = recurrent.sequence_model([recurrent.make_cell(kind, hidden)], RNN_OUTPUTS,
                                     last_step=True, unroll=unroll,
                                     recompute_every=recompute_every)

    @jax.jit
    def draw(key):
        params = model.init(key, (-1, time_steps, RNN_INPUTS))[1]
        x = jax.random.normal(jax.random.fold_in(key, 1), (batch, time_steps, RNN_INPUTS),
                              jnp.float32)
        targets = jax.random.normal(jax.random.fold_in(key, 2), (batch, RNN_OUTPUTS),
                                    jnp.float32)
        return params, x, targets

    return model, draw(key)


def torch_rnn(torch, cell, params):
    """The torch.nn module of `cell` (`cell.pytorch_module`: nn.LSTM, nn.GRU) and a Linear
    readout holding rnn_problem's params (`recurrent.to_pytorch`): the same function as its
    model. Returns (loss(x, targets), the parameters by name)."""
    from nets import recurrent

    device = torch_device(torch)
    recurrent_layer = getattr(torch.nn, cell.pytorch_module)(RNN_INPUTS, cell.hidden_size,
                                                               batch_first=True)
    recurrent_layer.load_state_dict({name: torch.from_numpy(array) for name, array
                                     in recurrent.to_pytorch(cell, params[0]).items()})
    readout = torch.nn.Linear(cell.hidden_size, RNN_OUTPUTS)
    readout.load_state_dict({"weight": torch.from_numpy(np.asarray(params[-1]["w"]).T.copy()),
                             "bias": torch.from_numpy(np.asarray(params[-1]["b"]).copy())})
    recurrent_layer.to(device)
    readout.to(device)

    def loss(x, targets):
        outputs, _ = recurrent_layer(x)
        return 0.5 * torch.sum((readout(outputs[:, -1]) - targets) ** 2) / x.shape[0]

    return loss, {**{f"rnn.{name}": p for name, p in recurrent_layer.named_parameters()},
                  **{f"readout.{name}": p for name, p in readout.named_parameters()}}


def rnn_torch_gradients(cell, grads):
    """Gradients of rnn_problem's params in torch_rnn's names and layouts."""
    from nets import recurrent

    cell_grads = recurrent.pytorch_gradients(cell, grads[0])
    return {**{f"rnn.{name}": g for name, g in cell_grads.items()},
            "readout.weight": np.asarray(grads[-1]["w"]).T, "readout.bias": grads[-1]["b"]}


def recompute_rows(sizes, key, mse, shape, base_fn, base_args, repeats):
    """The LSTM's manual step with gradient checkpointing through time (`recompute_every` k =
    sqrt(T), rounded down) against every step's residuals kept, alternated: time and XLA's
    temporaries."""
    every = max(1, math.isqrt(sizes.rnn[1]))
    model, args = rnn_problem("lstm", sizes, key, recompute_every=every)
    fn, compile_s = benchmark.compile_jitted(sgd_step(model, mse, nets.manual), *args)
    recomputed, base = benchmark.compare(fn, args, base_fn, base_args, repeats)
    recomputed.compile_s = compile_s
    name = f"recompute/lstm/{shape}"
    yield row("rnn", name, f"recompute_every_{every}", recomputed,
              recomputed.median_s / base.median_s, "recompute/every_step",
              temp_bytes=temp_bytes(fn))
    yield row("rnn", name, "every_step", base, temp_bytes=temp_bytes(base_fn))


# PyTorch's nn.LSTM and nn.GRU compute our lstm and gru_reset_after (recurrent.to_pytorch)
TORCH_RNNS = ("lstm", "gru_reset_after")


def family_rnn(config, key, torch):
    from nets import recurrent

    sizes = sizes_of(config)
    batch, time_steps, hidden = sizes.rnn
    shape = f"b{batch}_t{time_steps}_h{hidden}"
    mse = nets.Objective(nets.mean_squared_error(), 0.0)
    compiled_manual, models = {}, {}
    for kind in ("elman", "lstm", "gru", "gru_reset_after"):
        model, args = rnn_problem(kind, sizes, key)
        manual_fn, manual_compile = benchmark.compile_jitted(
            sgd_step(model, mse, nets.manual), *args)
        auto_fn, auto_compile = benchmark.compile_jitted(
            sgd_step(model, mse, nets.autodiff), *args)
        manual, auto = benchmark.compare(manual_fn, args, auto_fn, args, config.repeats)
        manual.compile_s, auto.compile_s = manual_compile, auto_compile
        yield row("rnn", f"engine/{kind}/{shape}", "manual", manual,
                  manual.median_s / auto.median_s, "manual/autodiff",
                  **memory_extras(manual_fn, auto_fn))
        yield row("rnn", f"engine/{kind}/{shape}", "autodiff", auto,
                  temp_bytes=temp_bytes(auto_fn))
        compiled_manual[kind], models[kind] = (manual_fn, args, manual_compile), model
        if untargeted_rows(config):
            # G v through time: a tangent scan and a BPTT scan by hand against
            # jvp-then-vjp; H v: a tangent scan and BPTT's R-operator against jax's jvp of
            # grad
            yield from gauss_newton_pair("rnn", f"{kind}/{shape}", model, mse, args, key,
                                         config.repeats)
            yield from product_pair("rnn", f"hessian/{kind}/{shape}", model, mse, args, key,
                                    config.repeats, (nets.engines.hessian_product,
                                                     hessian_product_reference))
    if untargeted_rows(config):
        yield from unroll_rows(sizes, key, mse, shape, compiled_manual["lstm"],
                               config.repeats)
        base_fn, base_args, _ = compiled_manual["lstm"]
        yield from recompute_rows(sizes, key, mse, shape, base_fn, base_args, config.repeats)
    for kind in TORCH_RNNS:
        ours_fn, args, compile_s = compiled_manual[kind]
        if torch is None:
            continue
        cell = recurrent.make_cell(kind, hidden)
        loss, parameters = torch_rnn(torch, cell, args[0])
        torch_args = tuple(torch.tensor(np.asarray(a), device=torch_device(torch))
                           for a in args[1:])
        check = functools.partial(
            torch_agreement, torch, f"rnn/{kind}",
            functools.partial(jax.jit(nets.manual(models[kind], mse)), *args),
            functools.partial(rnn_torch_gradients, cell), loss, parameters, torch_args)
        agreement = check()
        native = kind == "lstm" and torch_device(torch) == "cpu"
        native_agreement = without_onednn(torch, check)() if native else None  # before any step
        torch_step = torch_sgd_step(torch, loss, parameters)
        ours, theirs = benchmark.compare(ours_fn, args, torch_step, torch_args, config.repeats)
        ours.compile_s = compile_s
        module = f"torch_nn_{cell.pytorch_module.lower()}"
        yield row("rnn", f"torch/{kind}/{shape}", "jax_manual_scan", ours,
                  ours.median_s / theirs.median_s, f"jax/{module}",
                  torch_loss_rel_err=agreement["loss"],
                  torch_grad_rel_err=agreement["gradients"])
        yield row("rnn", f"torch/{kind}/{shape}", module, theirs,
                  torch_device=torch_device(torch))
        yield from data_parallel_rows(
            "rnn", f"torch/{kind}/{shape}", models[kind], mse, args,
            (module, torch_step, torch_args, f"jax/{module}"), config.repeats)
        if native:
            yield from native_lstm_rows(torch, shape, ours_fn, args, native_agreement,
                                        torch_step, torch_args, config.repeats)
    if torch is not None and untargeted_rows(config):
        yield from product_rows(torch, batch, time_steps, hidden, key, config.repeats)


def unroll_rows(sizes, key, mse, shape, compiled_lstm, repeats):
    """The LSTM's manual step with its scan unrolled 2, 4, 8 and 16 steps against unroll 1
    (`compiled_lstm`: its compiled step, arguments and compile time), alternated. No target."""
    base_fn, base_args, _ = compiled_lstm
    for unroll in (2, 4, 8, 16):
        model, args = rnn_problem("lstm", sizes, key, unroll=unroll)
        unrolled_fn, compile_s = benchmark.compile_jitted(sgd_step(model, mse, nets.manual),
                                                          *args)
        unrolled, base = benchmark.compare(unrolled_fn, args, base_fn, base_args, repeats)
        unrolled.compile_s = compile_s
        yield row("rnn", f"unroll/lstm/{shape}", f"unroll_{unroll}", unrolled,
                  unrolled.median_s / base.median_s, "unroll_k/unroll_1")


def step_products(batch, hidden):
    """The three matrix products of each time step of the reset-after GRU's training step,
    as its cell computes them: (label, lhs shape, rhs shape, contracted length, product).
    Forward h W_h (batch, hidden)(hidden, 3 hidden); backward dh = da_h W_h^T with W_h^T
    stored (`backward_weights`), (batch, 3 hidden)(3 hidden, hidden); the weight gradient
    h^T da_h, h (batch, hidden) contracted over the batch with da_h (batch, 3 hidden), added
    to a running sum (XLA folds the transpose into the product, as in the cell)."""
    gates = 3 * hidden
    return (("forward_h_wh", (batch, hidden), (hidden, gates), hidden, lambda a, b: a @ b),
            ("backward_da_wht", (batch, gates), (gates, hidden), gates, lambda a, b: a @ b),
            ("weight_gradient_ht_da", (batch, hidden), (batch, gates), batch,
             lambda a, b: a.T @ b))


def products_over_time(product, summed):
    """A jitted scan of `product` over a sequence: (lhs (T, ...), rhs) -> every step's
    product stacked, or with `summed` (the weight gradient, whose rhs is a sequence too) their
    running sum, as the cell's scans use them."""
    def run(lhs, rhs):
        if summed:
            total = jnp.zeros(jax.eval_shape(product, lhs[0], rhs[0]).shape, lhs.dtype)
            return lax.scan(lambda acc, ab: (acc + product(*ab), None), total, (lhs, rhs))[0]
        return lax.scan(lambda _, a: (None, product(a, rhs)), None, lhs)[1]

    return run


def torch_products_over_time(torch, summed):
    """PyTorch's side of `products_over_time`: a loop of torch.mm into each step's slot of
    one output, or of torch.addmm into one running sum, as eager autograd would run them."""
    def run(lhs, rhs):
        if summed:
            total = torch.zeros(lhs.shape[2], rhs.shape[2], device=lhs.device)
            for a, b in zip(lhs, rhs):
                torch.addmm(total, a.T, b, out=total)
            return total
        out = torch.empty(lhs.shape[0], lhs.shape[1], rhs.shape[1], device=lhs.device)
        for step, a in enumerate(lhs):
            torch.mm(a, rhs, out=out[step])
        return out

    return torch_synchronized(torch, run)


def product_rows(torch, batch, time_steps, hidden, key, repeats):
    """Each of `step_products` over `time_steps` steps, a jitted scan against a PyTorch loop
    on the same operands (no target): the rate at which each side multiplies matrices of one
    time step's size. On the 2-core CPU XLA:CPU runs these on one core where PyTorch's
    matmul uses both (BENCHMARKS.md), which is most of the recurrent rows' distance from
    nn.GRU and nn.LSTM. median_s is per sequence; flops_per_s counts its time_steps
    products."""
    for label, lhs_shape, rhs_shape, contracted, product in step_products(batch, hidden):
        summed = label.startswith("weight_gradient")
        a = jax.random.normal(jax.random.fold_in(key, 3), (time_steps, *lhs_shape), jnp.float32)
        b = jax.random.normal(jax.random.fold_in(key, 4),
                              (time_steps, *rhs_shape) if summed else rhs_shape, jnp.float32)
        ours, compile_s = benchmark.compile_jitted(products_over_time(product, summed), a, b)
        torch_args = tuple(torch.tensor(np.asarray(v), device=torch_device(torch)) for v in (a, b))
        theirs = torch_products_over_time(torch, summed)
        with jax.default_matmul_precision("highest"), torch_full_float32(torch):
            agreement = {"products": float(relative_error(
                np.asarray(ours(a, b)), theirs(*torch_args).cpu().numpy()))}
        same_function(f"rnn/product/{label}", agreement)
        ours_m, theirs_m = benchmark.compare(ours, (a, b), theirs, torch_args, repeats)
        ours_m.compile_s = compile_s
        flops = 2 * contracted * time_steps * float(np.prod(
            jax.eval_shape(product, a[0], b[0] if summed else b).shape))
        name = (f"product/{label}/{'x'.join(map(str, lhs_shape))}_"
                f"{'x'.join(map(str, rhs_shape))}_t{time_steps}")
        yield row("rnn", name, "jit_scan", ours_m, ours_m.median_s / theirs_m.median_s,
                  "jax/torch_loop", flops_per_s=flops / ours_m.median_s,
                  torch_products_rel_err=agreement["products"])
        yield row("rnn", name, "torch_loop", theirs_m, flops_per_s=flops / theirs_m.median_s,
                  torch_device=torch_device(torch))


def without_onednn(torch, function):
    """`function` run with PyTorch's oneDNN (mkldnn) backend off."""
    def run(*args):
        with warnings.catch_warnings():  # the flags' note on TF32 for Intel GPUs
            warnings.simplefilter("ignore", UserWarning)
            with torch.backends.mkldnn.flags(enabled=False):
                return function(*args)

    return run


def native_lstm_rows(torch, shape, ours_fn, args, checked, torch_step, torch_args, repeats):
    """Our scan LSTM against nn.LSTM with oneDNN off (no target): on a CPU nn.LSTM runs
    oneDNN's fused LSTM (`aten::mkldnn_rnn_layer` and its backward in PyTorch's profiler),
    and without it PyTorch's own LSTM kernels (63.0 against 82.9 ms a step, 2026-12-05); the
    GRU has no oneDNN path (66.6 and 65.6 ms). `checked`: the agreement of the two without
    oneDNN, taken with the first check, before any step moved the parameters."""
    ours, theirs = benchmark.compare(ours_fn, args, without_onednn(torch, torch_step),
                                     torch_args, repeats)
    name = f"torch_native/lstm/{shape}"
    yield row("rnn", name, "jax_manual_scan", ours, ours.median_s / theirs.median_s,
              "jax/torch_nn_lstm_without_onednn", torch_loss_rel_err=checked["loss"],
              torch_grad_rel_err=checked["gradients"])
    yield row("rnn", name, "torch_nn_lstm_without_onednn", theirs,
              torch_device=torch_device(torch))


# --- family: device scaling ----------------------------------------------------------------

def family_scaling(config, workdir, force=False):
    """`experiments.scaling` in a process of its own, in `workdir` (the bench's --force
    passed on, so that a forced bench re-run with other --repeats may re-run it there)."""
    import json
    import os
    import subprocess

    small = config.size == "smallest"
    command = [sys.executable, "-m", "experiments.scaling", "--workdir", str(workdir),
               "--no-per-example", "--engines", "manual",
               "--repetitions", str(config.repeats), "--seed", str(config.seed),
               *(["--forms", "shard_map", "--per-device-batch", "2", "--global-batch", "8"]
                 if small else []), *(["--force"] if force else [])]
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(__import__("pathlib").Path(__file__).resolve().parents[1]),
         os.environ.get("PYTHONPATH", "")])}
    environment.pop("XLA_FLAGS", None)  # let the experiment simulate its own devices
    subprocess.run(command, check=True, env=environment, stdout=subprocess.DEVNULL)
    scaling = json.loads((workdir / "results.json").read_text())["metrics"]["scaling"]
    rows = []
    for entry in scaling:
        if entry["form"] == "single":
            continue
        seconds = entry["step_ms"] / 1e3
        measurement = benchmark.Measurement(seconds, None, None, entry["compile_s"],
                                            config.repeats)
        rows.append(row("scaling", f"{entry['mode']}/{entry['form']}/{entry['engine']}",
                        f"{entry['devices']}_devices_batch_{entry['batch']}", measurement,
                        entry.get("efficiency"), "speedup/devices",
                        examples_per_s=entry["examples_per_s"]))
    return rows


# --- the suite -------------------------------------------------------------------------------

def load_torch():
    try:
        import torch
    except ImportError:
        return None
    return torch


def torch_device(torch) -> str:
    """Where the PyTorch references run: "cuda" when JAX runs on a GPU and this torch sees one
    (so that a ratio sets two GPU runs side by side: cuDNN's LSTM and GRU, PyTorch's
    convolutions), else "cpu"."""
    if jax.default_backend() == "gpu" and torch.cuda.is_available():
        return "cuda"
    return "cpu"


def torch_synchronized(torch, function):
    """`function`, followed on CUDA by a wait for the kernels it queued, so that its wall time
    counts them (`benchmark.compare` waits for JAX's arrays only)."""
    if torch_device(torch) == "cpu":
        return function

    def run(*args):
        result = function(*args)
        torch.cuda.synchronize()
        return result

    return run


def target_met(entry):
    for key in (f"{entry['family']}/{entry['name'].split('/')[0]}/"
                f"{entry['name'].split('/')[-1]}", f"{entry['family']}/{entry['name']}",
                f"{entry['family']}/{entry['name'].split('/')[0]}",
                f"{entry['family']}/{entry['name'].split('/')[-1]}", entry["family"]):
        if key in TARGETS:
            if TARGETS[key] is None:  # measured, with no target
                return None, None
            sense, bound = TARGETS[key]
            met = entry["ratio"] <= bound if sense == "<=" else entry["ratio"] >= bound
            if entry.get("temp_ratio") is not None:  # and no more temporaries than jax.grad
                return f"{sense} {bound:g}, temp <= 1", bool(met and entry["temp_ratio"] <= 1)
            return f"{sense} {bound:g}", bool(met)
    return None, None


def write_benchmarks(workdir, config, rows, seconds, torch, family_seconds=None) -> None:
    """results.json with the rows so far, each with its target and whether it was met;
    `seconds`: "run", the whole run's wall time so far, and "families", each finished
    family's (compilation, warm-up, timing and its references)."""
    for entry in rows:
        if entry["ratio"] is not None:
            entry["target"], entry["target_met"] = target_met(entry)
    results.write_results(
        workdir, EXPERIMENT, dataclasses.asdict(config),
        {"ratios": {f"{r['family']}/{r['name']}": r["ratio"] for r in rows
                    if r["ratio"] is not None},
         "targets_met": sum(bool(r.get("target_met")) for r in rows),
         "targets_missed": sum(r.get("target_met") is False for r in rows)},
        [], {"run": seconds, "families": dict(family_seconds or {})}, benchmarks=rows,
        threads=benchmark.thread_settings(), torch=None if torch is None else torch.__version__,
        devices=[str(d) for d in jax.devices()],
        matmul_precision=str(jax.config.jax_default_matmul_precision))


QUICK = {"repeats": 10, "recipe_passes": 1}  # what --quick sets


def quick_config(config):
    """The config with --quick's settings; a --repeats or --recipe-passes changed from its
    default beside --quick is a ConfigError, not replaced silently."""
    if not config.quick:
        return config
    defaults = Config()
    for name, value in QUICK.items():
        given = getattr(config, name)
        if given != getattr(defaults, name):
            flag = name.replace("_", "-")
            raise ConfigError(f"option --{flag}: got {given}; --quick sets it to {value} "
                              f"(give --{flag} without --quick)")
    return dataclasses.replace(config, **QUICK)


FAMILY_OPTIONS = {"recipe_passes": "recipe", "utilisation_dtypes": "utilisation"}


def check_family_options(config):
    """A family's own option changed from its default while that family is not run is a
    ConfigError (`--recipe-passes 2 --families engine` would time nothing of it)."""
    defaults = Config()
    for name, family in FAMILY_OPTIONS.items():
        given = getattr(config, name)
        if given != getattr(defaults, name) and family not in config.families:
            raise ConfigError(f"option --{name.replace('_', '-')}: got {given!r}; it applies "
                              f"only when --families includes {family} (got "
                              f"{','.join(config.families)})")
    return config


def main(argv=None):
    config, args = parse(Config, argv, __doc__, prog=f"python -m experiments.{EXPERIMENT}")
    config = quick_config(check_family_options(config))
    request_cpu_devices(config.cpu_devices)
    if config.reuse_memory and not benchmark.reuse_freed_memory():
        announce("--reuse-memory: this malloc is not glibc's; left as it is")
    run = open_run(EXPERIMENT, config, args, compilation_cache=False)  # compile_s: cold
    torch = load_torch()
    if torch is not None:
        torch.set_num_threads(benchmark.thread_settings()["cpu_count"])
    key = jax.random.key(config.seed)
    runners = {"engine": lambda: family_engine(config, key),
               "conv": lambda: family_conv(config, key),
               "recipe": lambda: family_recipe(config, key, torch),
               "lenet5_torch": lambda: family_lenet5_torch(config, key, torch),
               "per_example": lambda: family_per_example(config, key),
               "utilisation": lambda: family_utilisation(config, key),
               "rnn": lambda: family_rnn(config, key, torch),
               "scaling": lambda: family_scaling(config, run.workdir / "scaling", args.force)}
    rows, start, family_seconds = [], time.perf_counter(), {}
    for family in config.families:
        print(f"bench: {family} ...", flush=True)
        family_start = time.perf_counter()
        for entry in runners[family]():
            rows.append(entry)
            print(f"  {row_summary(entry)}", flush=True)
            # after every row, so that a run cut short (a time limit) keeps what it measured
            write_benchmarks(run.workdir, config, rows, time.perf_counter() - start, torch,
                             family_seconds)
        family_seconds[family] = time.perf_counter() - family_start
        print(f"bench: {family} took {family_seconds[family]:.1f} s", flush=True)
    write_benchmarks(run.workdir, config, rows, time.perf_counter() - start, torch,
                     family_seconds)
    ratios = [r for r in rows if r["ratio"] is not None]
    if ratios:
        plots.save_bars(run.workdir / "ratios.png",
                        {f"{r['family']}/{r['name']}": r["ratio"] for r in ratios},
                        xlabel="ratio (this codebase / reference; see ratio_of)", log=True)
    columns = ["family", "name", "variant", "median_s", "p10_s", "p90_s", "compile_s",
               "temp_bytes", "temp_ratio", "ratio", "ratio_of", "target", "target_met"]
    header = (f"device {device_name()} ({len(jax.devices())} devices; host CPU "
              f"{results.cpu_model()}), jax "
              f"{jax.__version__}, torch {None if torch is None else torch.__version__}, threads "
              f"{benchmark.thread_settings()}\n\n")
    results.save_and_print_table(run.workdir, header + results.markdown_table(rows, columns)
                                 + agreement_note(rows) + f"\nResults in {run.workdir}\n")
    return rows


def announce(what: str) -> None:
    """A log line before a step that may take long (a compile): a run cut short by a time
    limit then says where it was."""
    print(f"  {what} ...", flush=True)


def row_summary(entry) -> str:
    """One line for the log as each row is measured: name, variant, median, ratio."""
    ratio = "" if entry["ratio"] is None else f", {entry['ratio']:.3g} {entry['ratio_of']}"
    return (f"{entry['family']}/{entry['name']} {entry['variant']}: "
            f"{entry['median_s'] * 1e3:.4g} ms{ratio}")


def agreement_note(rows):
    """A line under the table: how closely each PyTorch reference computed our loss and
    gradients before it was timed ("" when none ran)."""
    checked = [r for r in rows if r.get("torch_grad_rel_err") is not None]
    if not checked:
        return ""
    each = "; ".join(f"{r['family']}/{r['name']} {r['torch_loss_rel_err']:.1e}, "
                     f"{r['torch_grad_rel_err']:.1e}" for r in checked)
    return ("\nPyTorch's loss and gradients against ours before timing (relative errors, "
            f"loss, gradients): {each}.\n")


if __name__ == "__main__":
    run_main(main, EXPERIMENT)
