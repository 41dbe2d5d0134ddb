"""One experiment at several seeds, each in a run directory of its own, and the spread of its
final metrics.

    python -m experiments.seeds --experiment lenet1989 --seeds 0-9 \\
        [--workdir DIR] [--metrics test_misses,test_error] [--at-most test_misses=100] \\
        [--jobs 2] -- --optimizer sdlm --init fan_in --schedule constant --lr 2e-4 \\
        --target 0.577

Everything after `--` goes to `python -m experiments.<experiment>` unchanged; this script adds
`--seed K --workdir DIR/seed_K` and runs the seeds one after another in this process (each
program compiled for the first seed is loaded from the compilation cache for the next,
`training.harness.use_compilation_cache`). The experiment's options are checked before the
first run, and `--seed` or `--workdir` among them are refused. Re-running the same command
with the same `--workdir` continues the sweep: a seed whose run finished is resumed by the
harness, which does no work for it (experiments without checkpoints run it again).
`--jobs N` runs N seeds at a time in spawned processes (`run_in_workers`), each with this
process's JAX settings and its output in `DIR/seed_K.log`.

Writes into DIR (default `runs/seeds/<experiment>/<UTC timestamp>/`):
- `results.json`: `metrics` {metric: {n, mean, sd, standard_error, median, min, max}} over
  the seeds (sd with n - 1; 0 for one seed; standard_error of the mean, sd / sqrt(n)),
  `history` one record per seed {"seed", metric: value}, and with `--at-most METRIC=VALUE`
  the seeds at or below the value and how many standard errors the mean lies from it
  (`mean_in_standard_errors`, positive above), `--at-least` likewise; where
  the runs list their misclassified test examples (lenet1989, lenet5), `misclassified`: how
  many seeds miss each example (the ten seeds above: 46 digits missed by all ten; results.md
  adds the most frequent confusions, there a 3 read as a 5 in 105 of the 1,045 mistakes);
  where they save their test outputs, `ensemble`: the misses of the label that the mean of
  the runs' outputs picks (the ten seeds above: 93 misses, 4.63%);
- `results.md`: the summary and the per-seed table; `spread.png`: each metric by seed.

Measured on the shared 2-core CPU (jax 0.10.2, 2026-12-03), the command above (`make
lenet1989-seeds`): test misses 120, 96, 99, 93, 110, 108, 98, 114, 94 and 113 at seeds 0-9,
mean 104.5, sd 9.62, median 103.5, "5 of 10 seeds have test_misses <= 100: [1, 2, 3, 6, 8]",
in 2 min 58 s; the same misses as ten separate runs. With `--jobs 2` (2026-12-04): the same
misses in 2 min 27 s; four seeds of the default recipe 46.4 s against 57.5-63.4 s with one.
The paper's single run: 102 misses.

The metrics are the numbers the experiment's `main` returns (a nested dict's keys joined by
"/"); `--metrics` picks some, in order (default: every number, booleans left out).
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import importlib
import math
import multiprocessing
import pathlib
import sys
import time
from typing import Sequence

import jax
import numpy as np

from training import plots, results
from training.config import ConfigError, check_applicable, option, parse, run_main
from training.harness import open_run
from training.metrics import confusions_line, most_frequent_confusions

EXPERIMENT = "seeds"
NOT_SWEPT = ("bench", "multihost_demo", "seeds",  # own processes and devices, or this script
             "gradcheck", "scaling")  # their main returns an exit status, no metrics


@dataclasses.dataclass(frozen=True)
class Config:
    experiment: str = option("lecture", "the experiment to run (a module of experiments/ whose "
                             "Config has a seed)")
    seeds: tuple[int, ...] = option((0, 1, 2), "the seeds, comma-separated; A-B for A to B",
                                    ge=0, distinct=False)  # check_seeds names them
    metrics: tuple[str, ...] = option((), "the metrics to summarise, in order (default: all)")
    at_most: str = option("", "METRIC=VALUE: count the seeds with METRIC <= VALUE")
    at_least: str = option("", "METRIC=VALUE: count the seeds with METRIC >= VALUE")
    jobs: int = option(1, "runs at once, each in a process of its own with its output in "
                          "DIR/seed_K.log (1: one after another in this process)", ge=1)


@dataclasses.dataclass(frozen=True)
class Sweep(Config):
    """The config with the experiment's own options (the argv after --), as config.json
    records it: resuming with other options is refused like any other config change."""

    experiment_options: tuple[str, ...] = ()


def split_argv(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """(this script's options, the experiment's): argv split at the first `--`."""
    argv = list(argv)
    if "--" not in argv:
        return argv, []
    cut = argv.index("--")
    return argv[:cut], argv[cut + 1:]


def experiment_module(name: str):
    """The module `experiments.<name>`, if it can be swept (`_sweepable`)."""
    module = None if name in NOT_SWEPT else _import(name)
    if module is None or not _sweepable(module):
        raise ConfigError(f"option --experiment: got {name!r}; allowed: an experiment with a "
                          f"--seed option and metrics, one of {', '.join(sweepable())}")
    return module


def _import(name: str):
    try:
        return importlib.import_module(f"experiments.{name}")
    except ModuleNotFoundError:
        return None


def _sweepable(module) -> bool:
    """Whether the module has a `main` and a dataclass `Config` with a seed field."""
    config_class = getattr(module, "Config", None)
    return (hasattr(module, "main") and dataclasses.is_dataclass(config_class)
            and "seed" in {field.name for field in dataclasses.fields(config_class)})


def sweepable() -> list[str]:
    """The experiments this script can run, by module name."""
    stems = sorted(path.stem for path in pathlib.Path(__file__).parent.glob("*.py")
                   if not path.stem.startswith("_") and path.stem not in NOT_SWEPT)
    return [stem for stem in stems if _sweepable(_import(stem))]


def check_seeds(seeds: Sequence[int]) -> None:
    """Refuse an empty or repeated --seeds (a seed's run directory holds one run)."""
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"option --seeds: got {','.join(map(str, seeds))}; allowed: "
                          "distinct seeds, at least one")


def check_experiment_options(module, options: Sequence[str]):
    """Refuse --seed and --workdir (set per run here), and any option the experiment would
    refuse, before the first run: a bad value, and one that would do nothing in the run (the
    experiment's ONLY_WITH, `training.config.check_applicable`). Returns the experiment's
    config at seed 0."""
    flags = {"--help", "--workdir", "--resume", "--force",
             *(f"--{field.name.replace('_', '-')}" for field in dataclasses.fields(module.Config))}
    for flag in ("--seed", "--workdir"):
        # argparse also takes an abbreviation that names one flag ("--see 3", "--work DIR"),
        # and the run's own --seed or --workdir, given after it, would win silently
        given = [o for o in options if o.startswith("--") and (o.partition("=")[0] == flag or [
            f for f in flags if f.startswith(o.partition("=")[0])] == [flag])]
        if given:
            shown = "" if given[0].partition("=")[0] == flag else f" (given as {given[0]!r})"
            raise ConfigError(f"experiment option {flag}{shown}: it is set for each run by "
                              f"experiments.{EXPERIMENT}; give the seeds with --seeds and the "
                              "directory with --workdir before the --")
    config, _ = parse(module.Config, [*options, "--seed", "0"],
                      prog=f"python -m {module.__name__}")
    return check_applicable(config, getattr(module, "ONLY_WITH", {}))


def threshold(text: str, flag: str) -> tuple[str, float] | None:
    """("metric", value) from "metric=value", or None for ""."""
    if not text:
        return None
    name, _, value = text.partition("=")
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not name.strip() or math.isnan(number):  # "=100" or "x=nan" would count no seed
        raise ConfigError(f"option --{flag}: got {text!r}; expected METRIC=VALUE, e.g. "
                          "test_misses=100")
    return name.strip(), number


def numbers(metrics: dict, prefix: str = "") -> dict[str, float]:
    """The numeric entries of a (nested) metrics dict, nested keys joined by "/", booleans
    and everything else left out."""
    found = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            found.update(numbers(value, name + "/"))
        elif isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
                value, (bool, np.bool_)):
            found[name] = float(value)
    return found


def summary(values: Sequence[float]) -> dict[str, float]:
    """n, mean, sd (n - 1 in the denominator; 0 for one value), standard_error (of the mean,
    sd / sqrt(n)), median, min, max."""
    array = np.asarray(values, np.float64)
    sd = results.sample_sd(array)
    return {"n": int(array.size), "mean": float(np.mean(array)), "sd": sd,
            "standard_error": sd / math.sqrt(array.size), "median": float(np.median(array)),
            "min": float(np.min(array)), "max": float(np.max(array))}


def standard_errors_from(values: Sequence[float], value: float) -> float | None:
    """(mean - value) / standard error: how far the mean lies from a threshold, in standard
    errors of the mean (above it if positive); None where the values do not vary."""
    stats = summary(values)
    if stats["standard_error"] == 0:
        return None
    return (stats["mean"] - value) / stats["standard_error"]


def chosen_metrics(config: Config, per_seed: list[dict]) -> list[str]:
    """--metrics, each checked against what every run returned; default: the first run's
    numbers in its order, those every run returned."""
    common = [name for name in per_seed[0] if all(name in row for row in per_seed)]
    if not config.metrics:
        return common
    missing = [name for name in config.metrics if name not in common]
    if missing:
        raise ConfigError(f"option --metrics: got {', '.join(missing)}; allowed: metrics every "
                          f"run returned, {', '.join(common)}")
    return list(config.metrics)


def counts(config: Config, per_seed: list[dict], seeds: Sequence[int]) -> dict:
    """{"at_most" / "at_least": {"metric", "value", "seeds", "count",
    "mean_in_standard_errors"}} for the options given: the seeds at or beyond the value, and
    how far the mean over the seeds lies from it (`standard_errors_from`)."""
    out = {}
    for flag, compare in (("at_most", np.less_equal), ("at_least", np.greater_equal)):
        rule = threshold(getattr(config, flag), flag.replace("_", "-"))
        if rule is None:
            continue
        name, value = rule
        if not all(name in row for row in per_seed):
            raise ConfigError(f"option --{flag.replace('_', '-')}: no metric {name!r} in every "
                              f"run; allowed: {', '.join(per_seed[0])}")
        meeting = [seed for seed, row in zip(seeds, per_seed) if compare(row[name], value)]
        out[flag] = {"metric": name, "value": value, "seeds": meeting, "count": len(meeting),
                     "mean_in_standard_errors": standard_errors_from(
                         [row[name] for row in per_seed], value)}
    return out


def misclassified_across(workdir: pathlib.Path, seeds: Sequence[int]) -> dict | None:
    """Where every run's results.json lists its misclassified test examples (lenet1989,
    lenet5): how many seeds miss each example. {"missed_by": {k: examples missed by exactly k
    seeds, k = 1..n}, "examples": [{"index", "label", "seeds": how many miss it, "predicted":
    {label: seeds}}], most-missed first}; None otherwise."""
    lists = []
    for seed in seeds:
        document = results.read_results(workdir / f"seed_{seed}")
        if "misclassified" not in document:
            return None
        lists.append(document["misclassified"])
    by_index = {}
    for wrong in lists:
        for row in wrong:
            entry = by_index.setdefault(row["index"], {"index": row["index"],
                                                       "label": row["label"], "seeds": 0,
                                                       "predicted": {}})
            entry["seeds"] += 1
            predicted = str(row["predicted"])
            entry["predicted"][predicted] = entry["predicted"].get(predicted, 0) + 1
    examples = sorted(by_index.values(), key=lambda e: (-e["seeds"], e["index"]))
    missed_by = {str(k): sum(e["seeds"] == k for e in examples) for k in range(1, len(seeds) + 1)}
    return {"missed_by": missed_by, "examples": examples}


def ensemble_of(workdir: pathlib.Path, seeds: Sequence[int]) -> dict | None:
    """Where every run saved its test outputs (`results.save_test_outputs`: lenet1989,
    lenet5), the ensemble that averages them: the label is the argmax of the mean of the runs'
    outputs (tanh outputs, or logits). {"runs", "misses", "error", "examples"}; None
    otherwise. Runs measured on different test examples are refused."""
    saved = [results.load_test_outputs(workdir / f"seed_{seed}") for seed in seeds]
    if any(entry is None for entry in saved):
        return None
    labels = saved[0][1]
    if any(not np.array_equal(entry[1], labels) for entry in saved):
        raise ValueError(f"{EXPERIMENT}: the runs in {workdir} were measured on different "
                         "test examples; no ensemble of them")
    mean = np.mean([entry[0] for entry in saved], axis=0)
    misses = int(np.sum(np.argmax(mean, axis=-1) != labels))
    return {"runs": len(saved), "misses": misses, "error": misses / labels.size,
            "examples": int(labels.size)}


def confusions(across: dict, top: int = 8) -> list[tuple[int, int, int]]:
    """The `top` most frequent (label, predicted, runs) over all runs' mistakes."""
    return most_frequent_confusions(
        ((example["label"], int(predicted), runs) for example in across["examples"]
         for predicted, runs in example["predicted"].items()), top)


def render_misclassified(across: dict, seeds: int) -> list[str]:
    """How the misclassified test examples are shared between the seeds, and the most
    frequent confusions."""
    missed_by = {int(k): v for k, v in across["missed_by"].items()}
    at_least_half = sum(v for k, v in missed_by.items() if 2 * k >= seeds)
    every = missed_by[seeds]
    return ["", f"Misclassified test examples: {sum(missed_by.values())} missed by at least "
                f"one seed, {at_least_half} by at least half, {every} by all {seeds}; by "
                f"exactly k seeds (k = 1..{seeds}): "
                f"{', '.join(str(missed_by[k]) for k in range(1, seeds + 1))}"
                " (results.json \"misclassified\" lists them)",
            "", "Most frequent confusions, label\u2192predicted (mistakes over all runs): "
                + confusions_line(confusions(across))]


def number(value: float) -> str:
    if float(value).is_integer() and abs(value) < 1e15:
        return f"{int(value):d}"
    return f"{value:.4g}"


PER_SEED_COLUMNS = 8


def per_seed_columns(config: Sweep, names: list[str], stats: dict) -> list[str]:
    """The per-seed table's columns: every --metrics name; by default the first
    PER_SEED_COLUMNS metrics that differ between seeds."""
    if config.metrics:
        return names
    varying = [n for n in names if not math.isclose(stats[n]["min"], stats[n]["max"])]
    return varying[:PER_SEED_COLUMNS]


def render(config: Sweep, names: list[str], stats: dict, per_seed: list[dict],
           tallies: dict, seconds: float, across: dict | None = None,
           ensemble: dict | None = None) -> str:
    options = " ".join(config.experiment_options) or "(defaults)"
    lines = [f"## {config.experiment} at {len(config.seeds)} seeds: {options}", "",
             "| metric | mean | sd | standard error | median | min | max |",
             "|---|---|---|---|---|---|---|"]
    for name in names:
        s = stats[name]
        lines.append(f"| {name} | {s['mean']:.4g} | {s['sd']:.3g} | {s['standard_error']:.3g} "
                     f"| {number(s['median'])} | {number(s['min'])} | {number(s['max'])} |")
    for flag, sign in (("at_most", "<="), ("at_least", ">=")):
        if flag in tallies:
            t = tallies[flag]
            lines += ["", f"{t['count']} of {len(config.seeds)} seeds have {t['metric']} "
                          f"{sign} {number(t['value'])}: {t['seeds']}"
                          + mean_against(stats[t["metric"]]["mean"], t)]
    columns = per_seed_columns(config, names, stats)
    lines += ["", "| seed | " + " | ".join(columns) + " |",
              "|---|" + "---|" * len(columns)]
    for seed, row in zip(config.seeds, per_seed):
        lines.append(f"| {seed} | " + " | ".join(number(row[n]) for n in columns) + " |")
    left_out = len(names) - len(columns)
    if left_out:
        lines += ["", f"({left_out} more metrics by seed in results.json, the same at every "
                      f"seed or past the first {PER_SEED_COLUMNS}; --metrics picks them)"]
    if across is not None:
        lines += render_misclassified(across, len(config.seeds))
    if ensemble is not None:
        lines += ["", f"The {ensemble['runs']} runs' test outputs averaged (one ensemble): "
                      f"{ensemble['misses']} misses of {ensemble['examples']} "
                      f"({ensemble['error']:.2%})"]
    lines += ["", f"{len(config.seeds)} runs in {seconds:.1f} s"]
    return "\n".join(lines) + "\n"


def mean_against(mean: float, tally: dict) -> str:
    """"; the mean, M, lies D standard errors above (below) V", or "" for values that do
    not vary."""
    distance = tally["mean_in_standard_errors"]
    if distance is None:
        return ""
    side = "above" if distance > 0 else "below"
    return (f"; the mean, {mean:.4g}, lies {abs(distance):.2f} standard errors {side} "
            f"{number(tally['value'])}")


def seed_argv(config: Sweep, seed: int, workdir: pathlib.Path, force: bool) -> list[str]:
    """The experiment's argv for one seed: its options, --seed K, --workdir DIR/seed_K."""
    argv = [*config.experiment_options, "--seed", str(seed),
            "--workdir", str(workdir / f"seed_{seed}")]
    return [*argv, "--force"] if force else argv


def check_first_run(config: Sweep, row: dict, seed: int) -> None:
    """Stop the sweep after its first finished run when that run returned nothing to
    summarise, or lacks a metric named by --metrics, --at-most or --at-least."""
    if not row:
        raise ConfigError(f"option --experiment: experiments.{config.experiment} "
                          "returned no metrics to summarise")
    chosen_metrics(config, [row])
    counts(config, [row], [seed])


def run_seeds(config: Sweep, module, workdir: pathlib.Path, force: bool) -> list[dict]:
    """Each seed's numbers (`numbers` of what the experiment's main returned), in the order
    of --seeds: one run after another in this process, or with --jobs N > 1 in N spawned
    processes (`run_in_worker`), which take this process's JAX settings."""
    if config.jobs == 1:
        per_seed = []
        for index, seed in enumerate(config.seeds):
            print(f"{EXPERIMENT}: {config.experiment} seed {seed} ({index + 1} of "
                  f"{len(config.seeds)})", flush=True)
            per_seed.append(numbers(_as_dict(module.main(seed_argv(config, seed, workdir,
                                                                   force)))))
            if index == 0:  # a misspelt metric stops the sweep after one run, not all of them
                check_first_run(config, per_seed[0], seed)
        return per_seed
    return run_in_workers(config, workdir, force)


def _as_dict(returned) -> dict:
    return returned if isinstance(returned, dict) else {}


JAX_SETTINGS = ("jax_enable_x64", "jax_numpy_rank_promotion", "jax_default_matmul_precision")


def run_in_workers(config: Sweep, workdir: pathlib.Path, force: bool) -> list[dict]:
    """--jobs N: the seeds in a pool of N spawned processes (fork is unsafe once JAX has
    started threads), each run's output in DIR/seed_K.log. A run is submitted only when a
    worker is free, so that the first run to finish is checked as with one job before any
    further run starts."""
    settings = {name: getattr(jax.config, name) for name in JAX_SETTINGS}
    workers = min(config.jobs, len(config.seeds))
    waiting, running, by_seed = list(config.seeds), {}, {}
    print(f"{EXPERIMENT}: {config.experiment} at {len(config.seeds)} seeds, {workers} at a "
          f"time; each run's output in {workdir}/seed_K.log", flush=True)
    with concurrent.futures.ProcessPoolExecutor(
            workers, mp_context=multiprocessing.get_context("spawn"),
            initializer=_apply_jax_settings, initargs=(settings,)) as pool:
        while waiting or running:
            while waiting and len(running) < workers:
                seed = waiting.pop(0)
                running[pool.submit(run_in_worker, config.experiment,
                                    seed_argv(config, seed, workdir, force),
                                    str(workdir / f"seed_{seed}.log"))] = seed
            done, _ = concurrent.futures.wait(running,
                                              return_when=concurrent.futures.FIRST_COMPLETED)
            for future in done:
                seed = running.pop(future)
                by_seed[seed] = future.result()
                print(f"{EXPERIMENT}: {config.experiment} seed {seed} done ({len(by_seed)} of "
                      f"{len(config.seeds)})", flush=True)
                if len(by_seed) == 1:
                    check_first_run(config, by_seed[seed], seed)
    return [by_seed[seed] for seed in config.seeds]


def _apply_jax_settings(settings: dict) -> None:
    for name, value in settings.items():
        jax.config.update(name, value)


def run_in_worker(experiment: str, argv: list[str], log_path: str) -> dict:
    """One run of experiments.<experiment> in a worker process, its stdout and stderr into
    log_path (not a terminal, so the run's progress stays quiet); its numbers."""
    module = importlib.import_module(f"experiments.{experiment}")
    with open(log_path, "w") as log, contextlib.redirect_stdout(log), \
            contextlib.redirect_stderr(log):
        return numbers(_as_dict(module.main(argv)))


def free_unused_workdir(workdir: pathlib.Path, seed_list: Sequence[int]) -> None:
    """After a run refused its options (its data checks), if no seed has finished, remove the
    sweep's config.json: nothing was run under it, and the corrected command must not be
    refused as a different config of this workdir."""
    if not any((workdir / f"seed_{seed}" / "results.json").exists() for seed in seed_list):
        (workdir / "config.json").unlink(missing_ok=True)


def main(argv=None):
    own, experiment_options = split_argv(sys.argv[1:] if argv is None else argv)
    parsed, args = parse(Config, own, __doc__, prog=f"python -m experiments.{EXPERIMENT}")
    config = Sweep(**dataclasses.asdict(parsed), experiment_options=tuple(experiment_options))
    check_seeds(config.seeds)
    for flag in ("at_most", "at_least"):
        threshold(getattr(config, flag), flag.replace("_", "-"))
    module = experiment_module(config.experiment)
    check_experiment_options(module, experiment_options)
    if args.workdir is None:
        args = dataclasses.replace(args, workdir=results.default_workdir(
            f"{EXPERIMENT}/{config.experiment}"))
    run = open_run(EXPERIMENT, config, args)

    start = time.perf_counter()
    try:
        per_seed = run_seeds(config, module, run.workdir, args.force)
    except ConfigError:
        free_unused_workdir(run.workdir, config.seeds)
        raise
    seconds = time.perf_counter() - start

    names = chosen_metrics(config, per_seed)
    stats = {name: summary([row[name] for row in per_seed]) for name in names}
    tallies = counts(config, per_seed, config.seeds)
    history = [{"seed": seed, **{name: row[name] for name in names}}
               for seed, row in zip(config.seeds, per_seed)]
    across = misclassified_across(run.workdir, config.seeds)
    ensemble = ensemble_of(run.workdir, config.seeds)
    results.write_results(run.workdir, EXPERIMENT, dataclasses.asdict(config), stats, history,
                          {"run": seconds}, thresholds=tallies,
                          runs={str(seed): f"seed_{seed}" for seed in config.seeds},
                          **({} if across is None else {"misclassified": across}),
                          **({} if ensemble is None else {"ensemble": ensemble}))
    x = np.asarray(config.seeds)
    panels = [{"xlabel": "seed", "ylabel": name, "marker": "o",
               "series": {"runs": (x, np.asarray([row[name] for row in per_seed])),
                          "mean": (x, np.full(x.shape, stats[name]["mean"]))}}
              for name in names if not math.isclose(stats[name]["min"], stats[name]["max"])]
    if panels:
        plots.save_curves(run.workdir / "spread.png", panels[:9],
                          title=f"{config.experiment} by seed")
    results.save_and_print_table(run.workdir, render(config, names, stats, per_seed, tallies,
                                                     seconds, across, ensemble))
    return {"summary": stats, "per_seed": history, "thresholds": tallies}


if __name__ == "__main__":
    run_main(main, EXPERIMENT)
