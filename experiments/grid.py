"""Several settings of one experiment, each at several seeds, and one table comparing them.

    python -m experiments.grid --experiment lenet1989 --seeds 0-4 [--jobs 2] \\
        --settings "--lr 0.006; --init fan_in --lr 0.006; --optimizer sdlm" \\
        [--metrics held_out_misses,test_misses] [--workdir DIR] -- --held-out 1000

`--settings` holds the settings, separated by ";", each a string of the experiment's options;
everything after `--` goes to every run. Setting K is a sweep of `experiments.seeds` in
DIR/setting_K (its runs in DIR/setting_K/seed_S), and the table is `experiments.compare` of
those sweeps: one row per setting, its options and "mean ± sd [min, max]" over the seeds of
each metric. An empty setting (as in "--lr 0.01;") is the experiment's defaults. Every
setting's options are checked before the first run; the same command with the same --workdir
continues an interrupted grid (finished runs do no work).

Writes into DIR (default runs/grid/<experiment>/<UTC timestamp>/): the sweeps; compare/, the
output of `experiments.compare` (compare.png: each setting's seeds and their mean +- sd);
results.json (the README's keys: "metrics" {setting_K: {metric: {n, mean, sd, min, max}}},
"history" one record per setting with its options; "differences", each later setting against
the first with standard errors, unpaired and paired by seed; and "missed_by_every_run" where
the runs list their misclassified test examples) and results.md, the tables.

`make lenet1989-held-out` is the README's table of 16 settings of LeNet-1989 at seeds 0-4 on
1,000 held-out training digits ("Choosing the 1989 settings without the test set").
"""
from __future__ import annotations

import dataclasses
import shlex
import sys
import time

from experiments import compare, seeds
from training import results
from training.config import ConfigError, option, parse, run_main
from training.harness import open_run

EXPERIMENT = "grid"


@dataclasses.dataclass(frozen=True)
class Config:
    experiment: str = option("lecture", "the experiment to run at every setting and seed")
    settings: str = option("", "the settings, separated by ';', each a string of the "
                               "experiment's options (e.g. \"--lr 0.01; --lr 0.02\")")
    seeds: tuple[int, ...] = option((0, 1, 2), "the seeds of every setting, comma-separated; "
                                               "A-B for A to B", ge=0,
                                    distinct=False)  # seeds.check_seeds names them
    metrics: tuple[str, ...] = option((), "the metrics to compare, in order (default: all)")
    jobs: int = option(1, "runs at once (experiments.seeds --jobs)", ge=1)


@dataclasses.dataclass(frozen=True)
class Grid(Config):
    """The config with the options of every run (the argv after --), as config.json records
    it: resuming with other options is refused like any other config change."""

    experiment_options: tuple[str, ...] = ()


def split_settings(text: str) -> list[list[str]]:
    """The settings as argv lists: "--lr 0.01; --lr 0.02" -> [["--lr", "0.01"], ["--lr",
    "0.02"]]. An empty setting (as in "--lr 0.01;") is the experiment's defaults."""
    if not text.strip():
        raise ConfigError("option --settings: got nothing; expected settings separated by "
                          "';', e.g. \"--lr 0.01; --lr 0.02\"")
    try:
        settings = [shlex.split(part) for part in text.split(";")]
    except ValueError as error:  # an unclosed quotation
        raise ConfigError(f"option --settings: got {text!r}; {error}; expected settings "
                          "separated by ';', each a string of options") from None
    if len({tuple(s) for s in settings}) != len(settings):
        raise ConfigError(f"option --settings: got {text!r}; allowed: distinct settings")
    return settings


def sweep_argv(config: Config, setting: list[str], common: list[str], workdir,
               force: bool = False) -> list[str]:
    """The argv of `experiments.seeds` for one setting."""
    argv = ["--experiment", config.experiment, "--seeds", ",".join(map(str, config.seeds)),
            "--jobs", str(config.jobs), "--workdir", str(workdir)]
    if config.metrics:
        argv += ["--metrics", ",".join(config.metrics)]
    if force:
        argv.append("--force")
    return [*argv, "--", *common, *setting]


def main(argv=None):
    own, common = seeds.split_argv(sys.argv[1:] if argv is None else argv)
    parsed, args = parse(Config, own, __doc__, prog=f"python -m experiments.{EXPERIMENT}")
    config = Grid(**dataclasses.asdict(parsed), experiment_options=tuple(common))
    settings = split_settings(config.settings)
    seeds.check_seeds(config.seeds)
    module = seeds.experiment_module(config.experiment)
    configs = [seeds.check_experiment_options(module, [*common, *setting])
               for setting in settings]
    for k, config_k in enumerate(configs):  # "--lr 0.01" and "--lr=0.01": the same runs
        if config_k in configs[:k]:
            first = configs.index(config_k)
            raise ConfigError(f"option --settings: settings {first + 1} and {k + 1} "
                              f"({' '.join(settings[first]) or '(defaults)'!r} and "
                              f"{' '.join(settings[k]) or '(defaults)'!r}) give the same "
                              f"config; allowed: distinct settings")
    if args.workdir is None:
        args = dataclasses.replace(args, workdir=results.default_workdir(
            f"{EXPERIMENT}/{config.experiment}"))
    run = open_run(EXPERIMENT, config, args)
    start = time.perf_counter()
    directories = [run.workdir / f"setting_{k}" for k in range(len(settings))]
    for k, (setting, directory) in enumerate(zip(settings, directories)):
        print(f"{EXPERIMENT}: setting {k + 1} of {len(settings)}: "
              f"{' '.join(setting) or '(defaults)'}", flush=True)
        try:
            seeds.main(sweep_argv(config, setting, common, directory, args.force))
        except ConfigError:
            # refused by a run's data checks before any run finished: the workdir is free again
            if not any(any(directory.glob("seed_*/results.json")) for directory in directories):
                (run.workdir / "config.json").unlink(missing_ok=True)
            raise
    comparison = run.workdir / "compare"
    compare.main([*map(str, directories), "--workdir", str(comparison),
                  *(["--metrics", ",".join(config.metrics)] if config.metrics else [])])
    compared = results.read_results(comparison)
    sweeps = compared["sweeps"]
    extra = {"differences": compared["differences"],
             **({"missed_by_every_run": compared["missed_by_every_run"]}
                if "missed_by_every_run" in compared else {})}
    results.write_results(run.workdir, EXPERIMENT, dataclasses.asdict(config),
                          {sweep["label"]: sweep["metrics"] for sweep in sweeps}, sweeps,
                          {"run": time.perf_counter() - start}, **extra)
    (run.workdir / "results.md").write_text((comparison / "results.md").read_text())
    return sweeps

if __name__ == "__main__":
    run_main(main, EXPERIMENT)
