"""Time per step over examples and over devices: per-example gradients, and data parallelism.

    python -m experiments.scaling [--workdir DIR] [--model mlp]
                                  [--forms shard_map,pmap,jit,explicit]
                                  [--engines manual,autodiff] [--no-per-example] ...

Part 1, per example (`training.parallel.per_example_value_and_grad`), for the MLP (256 inputs,
STEP 0's 768 hidden units, 10 outputs) and LeNet-5 at batch `--per-example-batch` (128), with
each engine: the step time of a plain batch-gradient SGD step, of the same step from the mean
of the per-example gradients, and of the DP-SGD step (clip to norm 1, noise multiplier 1;
with the manual engine also by ghost norms, `per_example="ghost"`);
and the time of the per-example gradients by `jax.vmap`, by `lax.map` (a compiled loop), and
by a Python loop over jitted single-example calls. Reported as ratios: per-example step /
batch step, and loop / vmap.

Part 2, scaling (`training.parallel.data_parallel`), for `--model` with every form and engine,
on 1, 2, 4, ... devices (powers of two up to all of them, and all of them): weak scaling at a
fixed per-device batch (`--per-device-batch`) and strong scaling at a fixed global batch
(`--global-batch`). Throughput is examples per second of training steps; speed-up and
efficiency compare with 1 device of the same form and engine: speed-up is the ratio of
throughputs, efficiency the speed-up over N (weak: T1 / TN; strong: T1 / (N TN)); the row
"single" is the plain jitted step with no mesh.

Timing: every function is called once (compilation plus one run: `compile_s` is that first
call less the steady step), then `--repetitions` samples are timed (default 10) with
`training.benchmark.time_calls`: each sample is one call waited for with `block_until_ready`,
or for a call under 2 ms the mean of as many such calls as make 2 ms; the median is
reported. On a CPU backend the experiment asks JAX for
`--cpu-devices` simulated devices (`jax_num_cpu_devices`, before JAX starts; an XLA_FLAGS
device count takes precedence): they share the machine's cores, so the numbers there show
only the overhead of each form, not a speed-up. The same command runs unchanged on a machine
with several GPUs or TPU cores, where the devices are real. The float32 matmul precision
(`--matmul-precision`, default the backend's "default") is printed and stored.

Writes DIR/results.json ("per_example" and "scaling" rows in metrics), results.md and
scaling.png (throughput against devices, weak and strong).

Measured on the 2-core CPU (jax 0.10.2, 4 simulated devices, shared with other jobs; about
1.5 minutes):
  per example, batch 128: the step from per-example gradients costs 50-60x the batch step for
  the MLP (its 128 per-example weight gradients are 128 x 256 x 768 floats, 100 MB, against
  one 256 x 768 matmul: memory-bound) and 2-3x for LeNet-5; DP-SGD 90-120x and 3-3.5x. The
  Python loop over examples is only 0.9-1.6x (MLP) and 1.3-1.9x (LeNet-5) the time of vmap on
  this CPU (each single-example gradient stays in cache, and the vmapped single-example
  convolutions gain little on XLA:CPU), lax.map 0.85-1.5x.
  scaling, MLP: about 1 ms a step on 1 device in every form (batch 32), 2-4 ms on 2 and 4
  simulated devices: no speed-up, as 4 "devices" share 2 cores; only the overhead shows.
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

import nets
from nets import engines, models
from training import benchmark, parallel, plots, results
from training.config import check_applicable, option, parse, run_main, to_dict
from training.harness import open_run

EXPERIMENT = "scaling"
MODELS = ("mlp", "lenet1989", "lenet5")
PRECISIONS = ("default", "high", "highest")
PRECISION_NOTE = {
    "default": "the backend's fastest float32 matmul: full float32 on CPU, TF32 on recent "
               "NVIDIA GPUs, bfloat16 passes on TPU",
    "high": "bfloat16_3x / TF32 passes",
    "highest": "full float32",
}


@dataclasses.dataclass(frozen=True)
class Config:
    model: str = option("mlp", "model of the scaling part", choices=MODELS)
    forms: tuple[str, ...] = option(parallel.FORMS, "data-parallel forms",
                                    choices=parallel.FORMS)
    engines: tuple[str, ...] = option(("manual", "autodiff"), "gradient engines",
                                      choices=tuple(engines.ENGINES))
    per_device_batch: int = option(32, "examples per device (weak scaling)", ge=1)
    global_batch: int = option(128, "examples per step in all (strong scaling)", ge=1)
    max_devices: int = option(0, "use at most this many devices (0: all)", ge=0)
    cpu_devices: int = option(4, "simulated devices when the backend is the CPU (0: as JAX "
                                 "starts)", ge=0)
    repetitions: int = option(10, "timed calls per measurement (the median is reported)",
                              ge=1)
    per_example: bool = option(True, "run part 1 (per-example gradients)")
    per_example_batch: int = option(128, "batch of part 1", ge=1)
    loop_repetitions: int = option(3, "timed Python loops over the batch in part 1", ge=1)
    clip_norm: float = option(1.0, "DP-SGD clipping norm C in part 1", gt=0)
    noise_multiplier: float = option(1.0, "DP-SGD noise multiplier sigma in part 1", ge=0)
    lr: float = option(0.01, "SGD learning rate of every timed step", gt=0)
    matmul_precision: str = option("default", "float32 matmul precision", choices=PRECISIONS)
    seed: int = option(0, "seed of the parameters and the data", ge=0)


# Part 1's options do nothing under --no-per-example: refused there, not ignored.
ONLY_WITH = dict.fromkeys(("per_example_batch", "loop_repetitions", "clip_norm",
                           "noise_multiplier"), ("per_example", True))


# --- problems and timing ---------------------------------------------------------------------

def problem(name: str, batch: int, key: jax.Array):
    """(model, objective, params, x, targets) for a model name, float32, random data."""
    if name == "mlp":
        model, input_shape = nets.build_mlp(256, 10), (256,)
        objective = nets.lecture_objective(1e-3)
    elif name == "lenet1989":
        model, input_shape = models.lenet1989(), (16, 16, 1)
        objective = nets.Objective(nets.mean_squared_error(), 1e-3)
    else:
        model, input_shape = models.lenet5(), (32, 32, 1)
        objective = nets.Objective(nets.mean_squared_error(), 1e-3)
    init_key, x_key, label_key = jax.random.split(key, 3)
    params = model.init(init_key, (-1, *input_shape))[1]
    x = jax.random.normal(x_key, (batch, *input_shape), jnp.float32)
    targets = jax.nn.one_hot(jax.random.randint(label_key, (batch,), 0, 10), 10,
                             dtype=jnp.float32)
    if name != "mlp":
        targets = 2 * targets - 1  # +-1 targets of the squared-error nets
    return model, objective, params, x, targets


def time_calls(function: Callable[[], Any], repetitions: int) -> dict:
    """{"first_s": the first call (compilation and one run), "median_s": the median of
    `repetitions` samples after it (`training.benchmark.time_calls`), "calls_per_sample"}."""
    start = time.perf_counter()
    jax.block_until_ready(function())
    first = time.perf_counter() - start
    steady = benchmark.time_calls(function, (), repetitions, warmup=1)
    return {"first_s": first, "median_s": steady.median_s,
            "compile_s": max(first - steady.median_s, 0.0),
            "calls_per_sample": steady.calls_per_sample}


def sgd_step(gradient: Callable, lr: float) -> Callable:
    """jit(params, x, targets, *rest -> params - lr * gradient(...))."""

    def step(params, x, targets, *rest):
        grad = gradient(params, x, targets, *rest)
        return jax.tree.map(lambda p, g: p - lr * g, params, grad)

    return jax.jit(step)


# --- part 1: per example ---------------------------------------------------------------------

def per_example_times(config: Config, engine: engines.Engine, model, objective, params, x,
                      targets) -> dict:
    """Part 1's timings for one model and engine: {label: time_calls(...)}. LeNet-5 keeps its
    default "tiles" convolutions throughout: under vmap over single examples they took 0.90
    of the time of "patches" (2026-12-05), and "rows" had made every example's band-matrix
    gradient Wp / kw times the size of dw and the step 1.3x slower."""
    batch_grad = engine(model, objective)
    per_example = parallel.per_example_value_and_grad(model, objective, engine)
    private = parallel.private_value_and_grad(model, objective, engine,
                                      clip_norm=config.clip_norm,
                                      noise_multiplier=config.noise_multiplier)
    single = jax.jit(engine(model, objective))  # one example, as a batch of one

    def mean_gradient(params, x, targets):
        weights = jnp.full(x.shape[0], 1 / x.shape[0])
        return parallel.weighted_sum(per_example(params, x, targets)[1], weights)

    batch_step = sgd_step(lambda *args: batch_grad(*args)[1], config.lr)
    per_example_step = sgd_step(mean_gradient, config.lr)
    private_step = sgd_step(lambda *args: private(*args)[1], config.lr)
    vmapped = jax.jit(per_example)
    mapped = jax.jit(lambda params, x, targets: jax.lax.map(
        lambda pair: single(params, pair[0][None], pair[1][None]), (x, targets)))
    key = jax.random.key(config.seed + 1)  # the DP-SGD noise
    repeat = config.repetitions
    ghost = {}
    if engine is engines.manual:  # the ghost norms run the hand-written backward themselves
        private_ghost = parallel.private_value_and_grad(
            model, objective, clip_norm=config.clip_norm,
            noise_multiplier=config.noise_multiplier, per_example="ghost")
        ghost_step = sgd_step(lambda *args: private_ghost(*args)[1], config.lr)
        ghost["private_ghost_step"] = time_calls(lambda: ghost_step(params, x, targets, key),
                                                 repeat)
    return {
        "batch_step": time_calls(lambda: batch_step(params, x, targets), repeat),
        "per_example_step": time_calls(lambda: per_example_step(params, x, targets), repeat),
        "private_step": time_calls(lambda: private_step(params, x, targets, key), repeat),
        **ghost,
        "vmap": time_calls(lambda: vmapped(params, x, targets), repeat),
        "lax_map": time_calls(lambda: mapped(params, x, targets), repeat),
        "python_loop": time_calls(lambda: [single(params, x[i:i + 1], targets[i:i + 1])
                                           for i in range(x.shape[0])],
                                  config.loop_repetitions),
    }


def per_example_rows(config: Config) -> list[dict]:
    """Step and gradient times of part 1 (module docstring), one row per model and engine."""
    rows = []
    for name in ("mlp", "lenet5"):
        case = problem(name, config.per_example_batch, jax.random.key(config.seed))
        for engine_name in config.engines:
            times = per_example_times(config, engines.get_engine(engine_name), *case)
            row = {"model": name, "engine": engine_name, "batch": config.per_example_batch}
            row.update({f"{label}_ms": 1e3 * t["median_s"] for label, t in times.items()})
            row.update({f"{label}_compile_s": t["compile_s"] for label, t in times.items()
                        if label != "python_loop"})
            row["per_example_over_batch_step"] = row["per_example_step_ms"] / row["batch_step_ms"]
            row["private_over_batch_step"] = row["private_step_ms"] / row["batch_step_ms"]
            if "private_ghost_step_ms" in row:
                row["private_ghost_over_batch_step"] = (row["private_ghost_step_ms"]
                                                        / row["batch_step_ms"])
            row["loop_over_vmap"] = row["python_loop_ms"] / row["vmap_ms"]
            row["lax_map_over_vmap"] = row["lax_map_ms"] / row["vmap_ms"]
            rows.append(row)
            print(f"per example: {name}/{engine_name} done", flush=True)
    return rows


# --- part 2: scaling -------------------------------------------------------------------------

def device_counts(available: int, limit: int) -> list[int]:
    """1, 2, 4, ... up to min(available, limit), and that number itself."""
    top = min(available, limit) if limit else available
    counts = [1]
    while counts[-1] * 2 <= top:
        counts.append(counts[-1] * 2)
    return counts + ([top] if counts[-1] != top else [])


def time_data_parallel(config: Config, form: str, engine_name: str, devices: int,
                       batch: int) -> dict:
    """Compile and step times of one data-parallel configuration (or "single": plain jit)."""
    model, objective, params, x, targets = problem(config.model, batch,
                                                   jax.random.key(config.seed))
    optimizer = optax.sgd(config.lr)
    engine = engines.get_engine(engine_name)
    if form == "single":
        value_and_grad = engine(model, objective)

        @jax.jit
        def step(params, opt_state, x, targets):
            energy, grad = value_and_grad(params, x, targets)
            updates, opt_state = optimizer.update(grad, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, energy, grad

        state = (params, optimizer.init(params))
        placed = (x, targets)
    else:
        mesh = parallel.batch_mesh(jax.devices()[:devices])
        run = parallel.data_parallel(model, objective, optimizer, engine=engine, form=form,
                                     mesh=mesh)
        step = run.step
        state = (run.place_state(params), run.place_state(optimizer.init(params)))
        placed = run.place_batch(np.asarray(x), np.asarray(targets))
    return time_calls(lambda: step(*state, *placed), config.repetitions)


def scaling_rows(config: Config) -> list[dict]:
    """Part 2 (module docstring): one row per form, engine, mode and device count."""
    counts = device_counts(jax.device_count(), config.max_devices)
    rows = []
    for engine_name in config.engines:
        for mode in ("weak", "strong"):
            first_batch = config.per_device_batch if mode == "weak" else config.global_batch
            rows.append({"form": "single", "engine": engine_name, "mode": mode, "devices": 1,
                         "batch": first_batch,
                         **_timing_columns(time_data_parallel(config, "single", engine_name,
                                                              1, first_batch), first_batch)})
            for form in config.forms:
                baseline = None
                for devices in counts:
                    batch = (config.per_device_batch * devices if mode == "weak"
                             else config.global_batch)
                    if batch % devices:
                        continue  # strong scaling needs a global batch the devices divide
                    timing = time_data_parallel(config, form, engine_name, devices, batch)
                    row = {"form": form, "engine": engine_name, "mode": mode,
                           "devices": devices, "batch": batch,
                           **_timing_columns(timing, batch)}
                    baseline = baseline or row
                    ratio = baseline["step_ms"] / row["step_ms"]
                    row["speedup"] = ratio * (row["batch"] / baseline["batch"])
                    row["efficiency"] = row["speedup"] / (devices / baseline["devices"])
                    rows.append(row)
            print(f"scaling: {engine_name}/{mode} done", flush=True)
    return rows


def _timing_columns(timing: dict, batch: int) -> dict:
    return {"compile_s": timing["compile_s"], "step_ms": 1e3 * timing["median_s"],
            "examples_per_s": batch / timing["median_s"]}


# --- the run ---------------------------------------------------------------------------------

def simulate_cpu_devices(count: int) -> str:
    """Ask for `count` CPU devices before JAX starts its backends; say what happened."""
    if not count:
        return "as JAX started"
    if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
        return "from XLA_FLAGS"
    try:
        jax.config.update("jax_num_cpu_devices", count)
    except RuntimeError:  # backends already started (e.g. called from a test process)
        return "as JAX had already started"
    return f"{count} requested (jax_num_cpu_devices)"


def plot(path, rows: list[dict]) -> None:
    panels = []
    for mode in ("weak", "strong"):
        series = {}
        for row in rows:
            if row["mode"] == mode and row["form"] != "single":
                xs, ys = series.setdefault(f"{row['form']}/{row['engine']}", ([], []))
                xs.append(row["devices"])
                ys.append(row["examples_per_s"])
        panels.append({"ylabel": f"examples/s ({mode} scaling)", "xlabel": "devices",
                       "series": series})
    plots.save_curves(path, panels, title="data-parallel throughput")


def main(argv=None) -> int:
    config, harness_args = parse(Config, argv, __doc__, prog=f"python -m experiments.{EXPERIMENT}")
    check_applicable(config, ONLY_WITH)
    cpu_devices = simulate_cpu_devices(config.cpu_devices)
    workdir = open_run(EXPERIMENT, config, harness_args).workdir
    backend = jax.default_backend()
    device_note = (f"{jax.device_count()} {backend} devices"
                   + (f" (simulated: {cpu_devices}) sharing {len(os.sched_getaffinity(0))} "
                      "cores: the numbers show overhead, not speed-up" if backend == "cpu"
                      else ""))
    precision_note = f"{config.matmul_precision} ({PRECISION_NOTE[config.matmul_precision]})"
    print(f"{device_note}; float32 matmul precision: {precision_note}", flush=True)
    start = time.perf_counter()
    with jax.default_matmul_precision(config.matmul_precision):
        per_example = per_example_rows(config) if config.per_example else []
        scaling = scaling_rows(config)
    seconds = {"compile": sum(row["compile_s"] for row in scaling), "run":
               time.perf_counter() - start}
    metrics = {"matmul_precision": precision_note, "devices": device_note,
               "per_example": per_example, "scaling": scaling}
    results.write_results(workdir, EXPERIMENT, {**to_dict(config), "cpu_devices_note":
                                                cpu_devices}, metrics, [], seconds)
    plot(workdir / "scaling.png", scaling)
    text = f"{device_note}\nfloat32 matmul precision: {precision_note}\n\n"
    if per_example:
        text += "Per-example gradients (median ms per call)\n\n" + results.markdown_table(
            per_example, ["model", "engine", "batch", "batch_step_ms", "per_example_step_ms",
                          "private_step_ms", "private_ghost_step_ms",
                          "per_example_over_batch_step", "private_over_batch_step",
                          "private_ghost_over_batch_step", "vmap_ms", "lax_map_ms",
                          "python_loop_ms",
                          "loop_over_vmap", "lax_map_over_vmap"]) + "\n"
    text += f"Data-parallel scaling, {config.model} (median of {config.repetitions} steps)\n\n"
    text += results.markdown_table(scaling, ["form", "engine", "mode", "devices", "batch",
                                             "compile_s", "step_ms", "examples_per_s",
                                             "speedup", "efficiency"])
    text += f"\nresults in {workdir}\n"
    results.save_and_print_table(workdir, text)
    return 0


if __name__ == "__main__":
    run_main(main, EXPERIMENT)
