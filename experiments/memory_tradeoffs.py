"""Memory against time: three ways to keep fewer numbers for the backward pass, measured.

    python -m experiments.memory_tradeoffs [--workdir DIR] [--time-steps 1000]
        [--recompute-every 5,10,32,100] [--blocks 8] [--remat-groups 1,2,4]
        [--micro-batches 2,4,8,16,32] [--repeats 5]

Each family compares the manual value and gradient (`nets.manual`, no update) of one model
computed the plain way with the same model computed another way, on random float32 data:

  recompute   an LSTM layer (--hidden units, --batch sequences of --time-steps steps of 32
              inputs) read at its last step by a Dense of 10, MSE: BPTT keeping every
              step's residuals, against `recompute_every=k` (`nets.recurrent.scan_cell`: a
              carry kept every k steps, each segment run forward again in the backward);
  remat       --blocks blocks Dense-tanh-Dense-tanh of --width units at batch --block-batch,
              then a Dense of 10, MSE: plain, against `nets.remat` around every g
              consecutive blocks (g in --remat-groups: one input kept per group, each group
              run forward again in the backward);
  accumulate  the MLP 784-1024-1024-10 (ReLU, softmax cross-entropy) at batch --mlp-batch:
              the whole batch at once, against `nets.accumulated` over k micro-batches.

For each setting: XLA's temporaries for the compiled program (`memory_analysis()`), the
median time of --repeats calls timed alternately with the plain program in one process
(`training.benchmark.compare`), their ratio, and the largest relative difference of any
gradient leaf from the plain program's (the same sums; accumulation adds them in another
order). The gradients themselves are checked against jax.grad in the tests.

Writes results.json (metrics: {family: [{setting, temp_mb, seconds, ratio,
max_rel_diff}]}, the plain program as setting "plain" with ratio 1), results.md and
memory_tradeoffs.png (time ratio against temporaries, one panel per family, the settings
in order of their temporaries).

Measured on the 2-core CPU (jax 0.10.2, 2026-12-05), defaults, 2 min 14 s (XLA
temporaries, time as a ratio to the plain program's):

    recompute (T 1000)   plain 599.2 MB; k = 5 105.3 MB 1.16x, 10 94.9 MB 1.13x,
                         32 148.2 MB 1.16x, 100 131.0 MB 1.19x
    remat (8 blocks)     plain 71.3 MB; groups of 1 46.1 MB 1.19x, of 2 37.7 MB 1.21x,
                         of 4 46.1 MB 1.15x
    accumulate (4096)    plain 67.1 MB; 2 parts 44.2 MB 0.93x, 4 24.2 MB 0.88x,
                         8 14.2 MB 0.91x, 16 9.2 MB 0.89x, 32 6.7 MB 0.99x

Every setting's gradients equal the plain program's (bit for bit where the sums are the
same; accumulation within 4.0e-7). Recomputation costs 1.13-1.21x the time for a sixth
(through time) or about half (blocks) of the temporaries, least where about sqrt(n) steps
or blocks share one kept input; accumulation costs nothing here (a micro-batch's working set
fits the caches better than the whole batch's).
"""
from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

import nets
from nets import recurrent
from training import benchmark, plots, results
from training.config import ConfigError, option, parse, run_main
from training.harness import open_run

EXPERIMENT = "memory_tradeoffs"
INPUTS, OUTPUTS = 32, 10


@dataclasses.dataclass(frozen=True)
class Config:
    time_steps: int = option(1000, "recompute: steps of each sequence", ge=1)
    hidden: int = option(256, "recompute: LSTM units", ge=1)
    batch: int = option(64, "recompute: sequences per batch", ge=1)
    recompute_every: tuple[int, ...] = option((5, 10, 32, 100), "recompute: the k of "
                                              "recompute_every to measure", ge=1)
    blocks: int = option(8, "remat: Dense-tanh-Dense-tanh blocks", ge=1)
    width: int = option(256, "remat: units of every block's layers", ge=1)
    block_batch: int = option(4096, "remat: batch", ge=1)
    remat_groups: tuple[int, ...] = option((1, 2, 4), "remat: blocks per remat, each a "
                                           "divisor of --blocks", ge=1)
    mlp_width: int = option(1024, "accumulate: the MLP's hidden units", ge=1)
    mlp_batch: int = option(4096, "accumulate: the whole batch", ge=1)
    micro_batches: tuple[int, ...] = option((2, 4, 8, 16, 32), "accumulate: micro-batch "
                                            "counts, each a divisor of --mlp-batch", ge=1)
    repeats: int = option(5, "timed calls of each program (alternated with the plain one)",
                          ge=1)
    seed: int = option(0, "seed of the params and data", ge=0)


def check(config) -> None:
    """Settings that cannot be built are a ConfigError naming the option."""
    for flag, values, whole in (("remat-groups", config.remat_groups, config.blocks),
                                ("micro-batches", config.micro_batches, config.mlp_batch)):
        uneven = [value for value in values if whole % value]
        if uneven:
            raise ConfigError(f"option --{flag}: {uneven} do not divide {whole}; allowed: "
                              "its divisors")
    too_long = [k for k in config.recompute_every if k > config.time_steps]
    if too_long:
        raise ConfigError(f"option --recompute-every: {too_long} exceed --time-steps "
                          f"{config.time_steps}")


def random_problem(model, input_shape, key):
    """params, x ~ N(0, 1) of input_shape and one-hot targets over OUTPUTS classes."""
    params = model.init(key, (-1, *input_shape[1:]))[1]
    x = jax.random.normal(jax.random.fold_in(key, 1), input_shape, jnp.float32)
    labels = jax.random.randint(jax.random.fold_in(key, 2), (input_shape[0],), 0, OUTPUTS)
    return params, x, jax.nn.one_hot(labels, OUTPUTS, dtype=jnp.float32)


def recompute_family(config, key):
    """((plain value_and_grad, args), {setting: (value_and_grad, args)}) of the family."""
    def model(every):
        return recurrent.sequence_model([recurrent.lstm(config.hidden)], OUTPUTS,
                                        last_step=True, recompute_every=every)

    mse = nets.Objective(nets.mean_squared_error(), 0.0)
    args = random_problem(model(None), (config.batch, config.time_steps, INPUTS), key)
    return ((nets.manual(model(None), mse), args),
            {f"recompute_every={k}": (nets.manual(model(k), mse), args)
             for k in config.recompute_every})


def blocks_model(config, group):
    """config.blocks blocks, each g = group consecutive ones in one `nets.remat` (no remat
    for group 0), and a Dense readout."""
    def block():
        return nets.serial(nets.Dense(config.width), nets.Tanh(), nets.Dense(config.width),
                           nets.Tanh())

    blocks = [block() for _ in range(config.blocks)]
    if group:
        blocks = [nets.remat(nets.serial(*blocks[start:start + group]))
                  for start in range(0, config.blocks, group)]
    return nets.serial(*blocks, nets.Dense(OUTPUTS))


def remat_family(config, key):
    """The plain blocks and each grouping, with the same params (regrouped: a remat of g
    blocks holds their params as one entry)."""
    mse = nets.Objective(nets.mean_squared_error(), 0.0)
    params, x, targets = random_problem(blocks_model(config, 0),
                                        (config.block_batch, config.width), key)

    def grouped(group):
        blocks = params[:-1]
        return tuple(tuple(blocks[start:start + group])
                     for start in range(0, config.blocks, group)) + (params[-1],)

    return ((nets.manual(blocks_model(config, 0), mse), (params, x, targets)),
            {f"remat of {g} block{'s' if g > 1 else ''}":
             (nets.manual(blocks_model(config, g), mse), (grouped(g), x, targets))
             for g in config.remat_groups})


def accumulate_family(config, key):
    model = nets.build_mlp(784, OUTPUTS, hidden_layers=2, hidden_units=config.mlp_width,
                           activation="relu")
    softmax = nets.Objective(nets.softmax_cross_entropy(), 0.0)
    args = random_problem(model, (config.mlp_batch, 784), key)
    return ((nets.manual(model, softmax), args),
            {f"{k} micro-batches": (nets.accumulated(nets.manual, k)(model, softmax), args)
             for k in config.micro_batches})


FAMILIES = {"recompute": recompute_family, "remat": remat_family,
            "accumulate": accumulate_family}


def max_rel_diff(grads, reference) -> float:
    """The largest over leaves of max |g - r| / max |r|."""
    return max(float(jnp.max(jnp.abs(g - r)) / jnp.max(jnp.abs(r)))
               for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(reference)))


def measure(plain, others, repeats):
    """Rows {setting, temp_mb, seconds, ratio, max_rel_diff}, the plain program's first, and
    the seconds spent compiling. plain and each of others: (value_and_grad, args)."""
    compile_s = 0.0
    compiled = {}
    for setting, (function, args) in {"plain": plain, **others}.items():
        compiled[setting], seconds = benchmark.compile_jitted(function, *args)
        compile_s += seconds
    plain_fn, plain_args = compiled["plain"], plain[1]
    reference = plain_fn(*plain_args)[1]
    rows, plain_times = [], []
    for setting, (_, args) in others.items():
        function = compiled[setting]
        timed, base = benchmark.compare(function, args, plain_fn, plain_args, repeats)
        plain_times.append(base.median_s)
        rows.append({"setting": setting, "temp_mb": temp_mb(function),
                     "seconds": timed.median_s, "ratio": timed.median_s / base.median_s,
                     "max_rel_diff": max_rel_diff(function(*args)[1], reference)})
    plain_row = {"setting": "plain", "temp_mb": temp_mb(plain_fn),
                 "seconds": float(np.median(plain_times)), "ratio": 1.0, "max_rel_diff": 0.0}
    return [plain_row, *rows], compile_s


def temp_mb(compiled) -> float:
    return compiled.memory_analysis().temp_size_in_bytes / 1e6


def main(argv=None):
    config, args = parse(Config, argv, __doc__, prog=f"python -m experiments.{EXPERIMENT}")
    check(config)
    run = open_run(EXPERIMENT, config, args)
    key = jax.random.key(config.seed)
    metrics_out, seconds = {}, {"compile": 0.0, "run": 0.0}
    for family, build in FAMILIES.items():
        print(f"{family}: compiling and timing", flush=True)
        start = time.perf_counter()
        rows, compile_s = measure(*build(config, key), config.repeats)
        seconds["compile"] += compile_s
        seconds["run"] += time.perf_counter() - start - compile_s
        metrics_out[family] = rows
        for row in rows:
            print(f"  {row['setting']}: {row['temp_mb']:.1f} MB, {row['ratio']:.3f}x",
                  flush=True)
    results.write_results(run.workdir, EXPERIMENT, dataclasses.asdict(config), metrics_out,
                          seconds=seconds)
    plots.save_curves(run.workdir / "memory_tradeoffs.png", [
        {"xlabel": "XLA temporaries (MB)", "ylabel": "time / plain program's", "marker": "o",
         "series": {family: tuple(zip(*sorted((row["temp_mb"], row["ratio"])
                                              for row in rows)))}}
        for family, rows in metrics_out.items()],
        title="Memory against time: recomputation and micro-batches (plain at ratio 1)")
    results.save_and_print_table(run.workdir, render(config, metrics_out, seconds,
                                                     run.workdir))
    return metrics_out


def render(config, metrics_out, seconds, workdir):
    titles = {"recompute": f"LSTM {config.hidden}, batch {config.batch}, "
                           f"T {config.time_steps}",
              "remat": f"{config.blocks} blocks of width {config.width}, batch "
                       f"{config.block_batch}",
              "accumulate": f"MLP 784-{config.mlp_width}-{config.mlp_width}-10, batch "
                            f"{config.mlp_batch}"}
    parts = []
    for family, rows in metrics_out.items():
        parts += [f"## {family}: {titles[family]}", results.markdown_table(rows)]
    parts.append(f"compile {seconds['compile']:.1f} s, run {seconds['run']:.1f} s. Results "
                 f"in {workdir}")
    return "\n".join(parts)


if __name__ == "__main__":
    run_main(main, EXPERIMENT)
