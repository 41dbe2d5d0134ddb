"""Data-parallel training over several processes: the MLP on one global batch, split by process.

    python -m experiments.multihost_demo --launch 2          # 2 CPU processes on 127.0.0.1
    make multihost-demo                                      # the same

`--launch N` starts N copies of this script on this machine (a free port on 127.0.0.1, gloo
collectives) and waits for them. Each copy (or each task of a cluster job: see README.md,
"Over examples, devices and hosts", for srun and TPU pods) joins the others with
`training.distributed.initialize` (flags --coordinator, --num-processes, --process-id, else
NETS_COORDINATOR, NETS_NUM_PROCESSES, NETS_PROCESS_ID, else JAX's cluster auto-detection),
takes its slice of the global batch (`distributed.local_part`), and runs `--steps` data-parallel
steps (`training.parallel.data_parallel`, `--form`) with every device of every process in one
mesh. Process 0 then trains the same MLP on the whole batch on one device and compares.

Only process 0 writes the run directory (config.json, environment.json, results.json); with
`--dump-params` every process also writes its own final parameters to
params_process<K>.npz (what the test compares).

Expected output (2 CPU processes, 20 steps, about 12 s on the 2-core CPU): each process
reports its examples ([0, 32) and [32, 64) of 64) and E at the first and the last step
(3.1341 -> 1.4020, the same in both); process 0 reports the largest relative difference of
the parameters from the single-device run, 1.6e-07 (float32 rounding of the all-reduce; matmul
precision "highest"), and writes results.json.
"""
from __future__ import annotations

import dataclasses
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import nets
from nets import engines
from nets.gradcheck import relative_error
from training import distributed, parallel, results
from training.config import option, parse, run_main, to_dict
from training.harness import open_run

EXPERIMENT = "multihost_demo"
INPUTS, CLASSES, HIDDEN = 16, 4, 48


@dataclasses.dataclass(frozen=True)
class Config:
    launch: int = option(0, "start this many local processes on 127.0.0.1 and wait (0: this "
                            "process is one of the run's processes)", ge=0)
    coordinator: str = option("", "host:port of process 0 (empty: $NETS_COORDINATOR, else "
                                  "auto-detected, else a single process)")
    num_processes: int = option(0, "processes in the run (0: $NETS_NUM_PROCESSES or "
                                   "auto-detected)", ge=0)
    process_id: int = option(-1, "this process (-1: $NETS_PROCESS_ID or auto-detected)", ge=-1)
    init_timeout: float = option(0.0, "seconds to wait for every process (0: "
                                      "$NETS_INIT_TIMEOUT, else 300)", ge=0)
    form: str = option("shard_map", "data-parallel form", choices=parallel.FORMS)
    engine: str = option("manual", "gradient engine", choices=tuple(engines.ENGINES))
    steps: int = option(20, "training steps", ge=1)
    batch: int = option(64, "global batch (split over processes, then devices)", ge=1)
    lr: float = option(0.5, "learning rate of plain gradient descent", gt=0)
    l2: float = option(0.01, "L2 penalty lambda", ge=0)
    seed: int = option(0, "seed of the data and the initial parameters", ge=0)
    matmul_precision: str = option("highest", "float32 matmul precision",
                                   choices=("default", "high", "highest"))
    dump_params: bool = option(False, "every process writes params_process<K>.npz")


def problem(config: Config):
    """(model, objective, params, x, targets): the whole global batch, identical in every
    process (float32 whatever jax_enable_x64 says). Labels come from a random linear teacher."""
    model = nets.build_mlp(INPUTS, CLASSES, hidden_units=HIDDEN)
    objective = nets.lecture_objective(config.l2)
    init_key, x_key, teacher_key = jax.random.split(jax.random.key(config.seed), 3)
    params = model.init(init_key, (-1, INPUTS))[1]
    x = jax.random.normal(x_key, (config.batch, INPUTS), jnp.float32)
    teacher = jax.random.normal(teacher_key, (INPUTS, CLASSES), jnp.float32)
    targets = jax.nn.one_hot(jnp.argmax(x @ teacher, axis=1), CLASSES, dtype=jnp.float32)
    return model, objective, params, np.asarray(x), np.asarray(targets)


def single_device_run(config: Config):
    """The reference: the same steps on the whole batch on one device. (params, energies)."""
    model, objective, params, x, targets = problem(config)
    value_and_grad = engines.get_engine(config.engine)(model, objective)
    optimizer = optax.sgd(config.lr)

    @jax.jit
    def step(params, opt_state):
        energy, grad = value_and_grad(params, x, targets)
        updates, opt_state = optimizer.update(grad, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, energy

    opt_state, energies = optimizer.init(params), []
    with jax.default_matmul_precision(config.matmul_precision):
        for _ in range(config.steps):
            params, opt_state, energy = step(params, opt_state)
            energies.append(float(energy))
    return jax.tree.map(np.asarray, params), energies


def data_parallel_run(config: Config):
    """This process's part of the run: (params, energies, local slice, seconds)."""
    model, objective, params, x, targets = problem(config)
    optimizer = optax.sgd(config.lr)
    run = parallel.data_parallel(model, objective, optimizer,
                                 engine=engines.get_engine(config.engine), form=config.form)
    part = distributed.process_slice(config.batch)
    x_local, targets_local = distributed.local_part((x, targets))
    batch = run.place_batch(x_local, targets_local)
    params, opt_state = run.place_state(params), run.place_state(optimizer.init(params))
    energies, start = [], time.perf_counter()
    with jax.default_matmul_precision(config.matmul_precision):
        for _ in range(config.steps):
            params, opt_state, energy, _ = run.step(params, opt_state, *batch)
            energies.append(float(run.fetch(energy)))
    return run.fetch(params), energies, part, time.perf_counter() - start


def _flat(params) -> dict:
    return {jax.tree_util.keystr(path): np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}


def _child_flags(config: Config, workdir) -> list[str]:
    flags = ["--workdir", str(workdir)]
    skip = {"launch", "coordinator", "num_processes", "process_id"}
    for name, value in to_dict(config).items():
        flag = "--" + name.replace("_", "-")
        if name in skip:
            continue
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + flag[2:])
        else:
            flags += [flag, str(value)]
    return flags


def launch(config: Config, workdir) -> int:
    """Start config.launch local processes of this script and relay their output."""
    command = [sys.executable, "-m", f"experiments.{EXPERIMENT}", *_child_flags(config,
                                                                               workdir)]
    timeout = (config.init_timeout or distributed.DEFAULT_INIT_TIMEOUT) + 600
    finished = distributed.launch_local(command, config.launch, timeout=timeout,
                                        init_timeout=config.init_timeout or None)
    for index, process in enumerate(finished):
        print(process.stdout, end="")
        if process.returncode:
            print(f"process {index} exited with status {process.returncode}:\n"
                  f"{process.stderr[-3000:]}", file=sys.stderr)
    return max(abs(process.returncode) for process in finished)


def main(argv=None) -> int:
    config, harness_args = parse(Config, argv, __doc__, prog=f"python -m experiments.{EXPERIMENT}")
    if config.launch:
        workdir = harness_args.workdir or results.default_workdir(EXPERIMENT)
        return launch(config, workdir)
    info = distributed.initialize(config.coordinator or None, config.num_processes or None,
                                  None if config.process_id < 0 else config.process_id,
                                  initialization_timeout=config.init_timeout or None)
    params, energies, part, seconds = data_parallel_run(config)
    print(f"process {info.index} of {info.count}: examples [{part.start}, {part.stop}) of "
          f"{config.batch}, {jax.local_device_count()} local of {jax.device_count()} devices, "
          f"E {energies[0]:.4f} -> {energies[-1]:.4f}", flush=True)
    workdir = harness_args.workdir or results.default_workdir(EXPERIMENT)
    if config.dump_params:
        workdir.mkdir(parents=True, exist_ok=True)
        np.savez(workdir / f"params_process{info.index}.npz", **_flat(params))
    if not distributed.is_main_process():
        return 0
    workdir = open_run(EXPERIMENT, config, harness_args).workdir
    reference, reference_energies = single_device_run(config)
    difference = max(relative_error(a, b) for a, b in
                     zip(jax.tree.leaves(params), jax.tree.leaves(reference)))
    metrics = {"processes": info.count, "devices": jax.device_count(),
               "final_energy": energies[-1], "single_device_final_energy": reference_energies[-1],
               "max_rel_diff_vs_single_device": difference,
               "matmul_precision": config.matmul_precision}
    history = [{"step": i + 1, "energy": e} for i, e in enumerate(energies)]
    results.write_results(workdir, EXPERIMENT, to_dict(config), metrics, history,
                          {"compile": None, "run": seconds})
    print(f"{info.count} processes, {jax.device_count()} devices, form {config.form}: largest "
          f"relative difference from the single-device run {difference:.2e}; results in "
          f"{workdir}", flush=True)
    return 0


if __name__ == "__main__":
    run_main(main, EXPERIMENT)
