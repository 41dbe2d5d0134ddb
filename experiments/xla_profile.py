"""Where the time of one jitted training step goes, operation by operation, as XLA ran it.

    python -m experiments.xla_profile [--workdir DIR] [--model lstm] [--engine manual]
        [--size full|smallest] [--repeats 5] [--top 30] [--seed 0]

The models are `experiments.layer_profile`'s (the bench's engine and rnn cases and AlexNet),
at its sizes; the step is the bench's SGD step (`bench.sgd_step`, lr 0.01) with the chosen
engine. It is compiled, warmed up, timed (`training.benchmark.time_calls`), then run
`--repeats` times under `jax.profiler.trace` with XLA:CPU's per-operation trace events on
(`--xla_cpu_enable_xprof_traceme=true`, added to XLA_FLAGS before JAX starts: run it as its
own process). Every trace event named after an instruction of the compiled program (a thunk:
a fusion, a library product such as `ynn_fusion`, a copy, a loop) is summed per instruction
and divided by the repetitions, and joined with the instruction's shape, its kind and the
JAX operation it came from (`op_name` of the compiled HLO, e.g.
`jit(step)/while/body/closed_call/dot_general`): the table that found the costs recorded in
BENCHMARKS.md (the GRUs' per-step weight copies, the LSTM's residual zero-fill, LeNet-5's
loops over a last axis of 6). A loop (a scan's `while`) is listed by the thunks of its body,
`calls_per_step` counting its iterations (any row of a loop instruction itself is left out of
`thunks_ms`, the sum of the rows). Thunks may run side by side on the intra-op threads, so
that sum can exceed the step's wall time (the bench's LSTM: 90.7 against 89.6 ms). Shares
are of the traced steps' own wall time (`traced_step_ms`, tracing's overhead included: at
`--size smallest` it is about three times the untraced median `step_ms`, at the full sizes
about the same), so that a pause of the machine lands in both sides of the ratio.

On a GPU the events are kernels, whose names need not be instruction names: the table then
lists the kernels whose names match, and `matched_share` says how much of the step that is.

Writes results.json ("thunks": one row per instruction, slowest first: name, kind, shape,
op_name, calls_per_step, ms_per_step, share of the step), results.md (the `--top` rows) and
xla_profile.png (their times); the trace itself stays in DIR/trace for Perfetto or
TensorBoard.
"""
from __future__ import annotations

import collections
import dataclasses
import gzip
import json
import os
import pathlib
import re
import time

import jax

import nets
from experiments import bench
from experiments.layer_profile import MODELS, model_cases
from training import benchmark, plots, results
from training.config import option, parse, run_main
from training.harness import open_run

EXPERIMENT = "xla_profile"
TRACEME_FLAG = "--xla_cpu_enable_xprof_traceme=true"
LOOP_OPCODES = ("while", "conditional", "call")

# "  %name = f32[64,256]{1,0} fusion(...), kind=kLoop, ..., metadata={op_name="..." ...}"
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+) = (\S+?)(?:\{[\d,]*\})? ([\w\-]+)\(")
_KIND = re.compile(r"kind=(\w+)")
_CUSTOM_KIND = re.compile(r'"kind":"(\w+)"')
_OP_NAME = re.compile(r'op_name="([^"]*)"')


@dataclasses.dataclass(frozen=True)
class Config:
    model: str = option("lstm", "the model whose step is profiled", choices=MODELS)
    engine: str = option("manual", "the step's gradient", choices=("manual", "autodiff"))
    size: str = option("full", "full: the bench's sizes; smallest: tiny sizes for smoke tests",
                       choices=("full", "smallest"))
    repeats: int = option(5, "traced steps (each thunk's time is their mean)", ge=1)
    top: int = option(30, "rows of the printed table and the plot", ge=1)
    seed: int = option(0, "seed of the parameters and the batch", ge=0)


def enable_trace_events() -> None:
    """Add TRACEME_FLAG to XLA_FLAGS; it takes effect only if JAX's CPU backend has not
    started yet in this process."""
    flags = os.environ.get("XLA_FLAGS", "")
    if TRACEME_FLAG not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {TRACEME_FLAG}".strip()


def instructions(hlo_text: str) -> dict[str, dict]:
    """{instruction name: {"opcode", "kind", "shape", "op_name"}} of a compiled program's text
    (every computation's instructions, fused ones included)."""
    table = {}
    for line in hlo_text.splitlines():
        match = _INSTRUCTION.match(line)
        if not match:
            continue
        name, shape, opcode = match.groups()
        kind = _CUSTOM_KIND.search(line) or _KIND.search(line)
        op_name = _OP_NAME.search(line)
        table[name] = {"opcode": opcode, "kind": kind.group(1) if kind else opcode,
                       "shape": shape, "op_name": op_name.group(1) if op_name else ""}
    return table


def trace_events(trace_dir) -> list[dict]:
    """The complete ('X') events of the one `.trace.json.gz` under trace_dir."""
    paths = sorted(pathlib.Path(trace_dir).rglob("*.trace.json.gz"))
    if not paths:
        raise FileNotFoundError(f"xla_profile: no .trace.json.gz under {trace_dir}")
    with gzip.open(paths[-1]) as handle:
        document = json.load(handle)
    events = document["traceEvents"] if isinstance(document, dict) else document
    return [e for e in events if e.get("ph") == "X" and "dur" in e]


def thunk_rows(events: list[dict], table: dict[str, dict], steps: int, step_s: float
               ) -> list[dict]:
    """One row per instruction with trace events, slowest first: its mean time per step
    (event durations are in microseconds) and share of the step's wall time, step_s."""
    total_us, calls = collections.Counter(), collections.Counter()
    for event in events:
        if event["name"] in table:
            total_us[event["name"]] += event["dur"]
            calls[event["name"]] += 1
    rows = []
    for name, microseconds in total_us.most_common():
        ms_per_step = microseconds / steps / 1e3
        rows.append({"name": name, **table[name], "calls_per_step": calls[name] / steps,
                     "ms_per_step": ms_per_step, "share": ms_per_step / (step_s * 1e3)})
    return rows


def profile(config: Config, trace_dir) -> dict:
    """Compile, time and trace the step; the rows and the step's numbers."""
    sizes = bench.SMALLEST if config.size == "smallest" else bench.Sizes()
    label, model, objective, input_shape, batch = model_cases(sizes)[config.model]
    args = bench.random_problem(model, input_shape, batch, jax.random.key(config.seed))
    engine = nets.get_engine(config.engine)
    step, compile_s = benchmark.compile_jitted(bench.sgd_step(model, objective, engine), *args)
    timing = benchmark.time_calls(step, args, max(10, config.repeats))
    with jax.profiler.trace(str(trace_dir), create_perfetto_trace=True):
        start = time.perf_counter()
        for _ in range(config.repeats):
            jax.block_until_ready(step(*args))
        traced_step_s = (time.perf_counter() - start) / config.repeats
    table = instructions(step.as_text())
    rows = thunk_rows(trace_events(trace_dir), table, config.repeats, traced_step_s)
    if not rows:
        raise RuntimeError("xla_profile: the trace has no per-operation events; XLA_FLAGS needs "
                           f"{TRACEME_FLAG} before JAX starts (run this as its own process)")
    inner = [r for r in rows if r["opcode"] not in LOOP_OPCODES]
    return {"case": label, "step_ms": timing.median_s * 1e3,
            "traced_step_ms": traced_step_s * 1e3, "compile_s": compile_s,
            "temp_bytes": bench.temp_bytes(step), "thunks": rows,
            "thunks_ms": sum(r["ms_per_step"] for r in inner),
            "matched_share": sum(r["share"] for r in inner)}


def render(profiled: dict, top: int, workdir) -> str:
    shown = [{"thunk": r["name"], "kind": r["kind"], "shape": r["shape"],
              "calls/step": round(r["calls_per_step"], 2), "ms/step": round(r["ms_per_step"], 4),
              "share": f"{r['share']:.1%}", "from": r["op_name"].split("/", 1)[-1]}
             for r in profiled["thunks"][:top]]
    return (f"{profiled['case']}: step {profiled['step_ms']:.3f} ms (median; traced "
            f"{profiled['traced_step_ms']:.3f} ms), thunks outside loops "
            f"{profiled['thunks_ms']:.3f} ms ({profiled['matched_share']:.0%} of the traced "
            "step; side by side on the threads they may exceed it)\n\n"
            + results.markdown_table(shown) + f"\nResults in {workdir}\n")


def main(argv=None):
    enable_trace_events()
    config, args = parse(Config, argv, __doc__, prog=f"python -m experiments.{EXPERIMENT}")
    run = open_run(EXPERIMENT, config, args, compilation_cache=False)
    profiled = profile(config, run.workdir / "trace")
    metrics = {key: profiled[key] for key in ("case", "step_ms", "traced_step_ms",
                                                    "thunks_ms", "matched_share")}
    metrics["slowest"] = [r["name"] for r in profiled["thunks"][:5]]
    results.write_results(run.workdir, EXPERIMENT, dataclasses.asdict(config), metrics, [],
                          {"compile": profiled["compile_s"]}, thunks=profiled["thunks"],
                          temp_bytes=profiled["temp_bytes"], threads=benchmark.thread_settings(),
                          device=bench.device_name())
    top = profiled["thunks"][:config.top]
    plots.save_bars(run.workdir / "xla_profile.png",
                    {f"{r['name']} {r['shape']}": r["ms_per_step"] for r in top},
                    "ms per step", title=f"{profiled['case']}: the slowest thunks",
                    reference=None)
    results.save_and_print_table(run.workdir, render(profiled, config.top, run.workdir))
    return metrics


if __name__ == "__main__":
    run_main(main, EXPERIMENT)
