"""Compare finished runs: their curves overlaid and their final metrics side by side.

    python -m experiments.compare RUN_DIR [RUN_DIR ...] [--workdir DIR] [--metrics a,b]

Reads each run's results.json (the README's keys): the "history" records become curves, one
panel per numeric quantity the runs share (loss, errors, ...), one line per run, against the
step, pass, epoch or seed the records count (COUNTERS; their index otherwise); the scalar
"metrics" (nested ones flattened as a.b) become a table with one column per run; a --metrics
name that no run has is refused. Writes DIR/compare.png, DIR/results.json (every experiment's
keys, with "metrics": {name: [value per run]}, and "runs", "labels", "curves") and
DIR/results.md, then prints the table. DIR defaults to runs/compare/<UTC timestamp>/; a DIR
holding another experiment's results.json (one of the runs) is refused, not overwritten.

When every directory is a sweep of `experiments.seeds`, the table has one row per sweep
instead: its experiment options, its number of seeds, and for each metric (--metrics picks
them by the sweep's own names, e.g. test_misses) "mean ± sd [min, max]" over its seeds;
compare.png shows each sweep's seeds and their mean +- sd, one panel per metric;
results.json adds "sweeps", one record per sweep, and where the sweeps count their runs'
misclassified test examples (lenet1989, lenet5), "missed_by_every_run": the examples every
seed of every sweep gets wrong. A second table sets every later sweep against the first,
metric by metric (results.json "differences"): the difference of the means with its standard
error sqrt(sd_a^2/n_a + sd_b^2/n_b), and, over the seeds both sweeps ran, the mean of the
per-seed differences with its standard error sd_d/sqrt(n) (a seed starts both runs from the
same weights, so pairing them removes what the seed alone decides, where it decides much).
E.g. several settings of LeNet-1989 on held-out digits, one sweep each:

    python -m experiments.compare runs/seeds/lenet1989/* --metrics held_out_misses,test_misses
"""
from __future__ import annotations

import argparse
import json
import pathlib
import time

import numpy as np

from training import plots, results
from training.config import ConfigError, run_main

EXPERIMENT = "compare"


def flatten(metrics: dict, prefix: str = "") -> dict:
    """Scalar entries of a nested dict as {"a.b": value}; lists and strings are left out."""
    flat = {}
    for name, value in metrics.items():
        key = f"{prefix}{name}"
        if isinstance(value, dict):
            flat.update(flatten(value, key + "."))
        elif isinstance(value, (int, float, bool)) and not isinstance(value, str):
            flat[key] = value
    return flat


# What a history record counts, by experiment: steps (the lecture), passes (the LeNets),
# epochs (the language models), seeds (experiments.seeds).
COUNTERS = ("step", "pass", "epoch", "seed")


def counter(histories: list[list[dict]]) -> str | None:
    """The first of COUNTERS that every run's history records, or None."""
    return next((name for name in COUNTERS
                 if histories and all(h and name in h[0] for h in histories)), None)


def shared_curves(histories: list[list[dict]]) -> list[str]:
    """Numeric history keys (other than the counter) present in every run, in first-run
    order."""
    if not histories or not all(histories):
        return []
    names = [k for k, v in histories[0][0].items()
             if k != counter(histories) and isinstance(v, (int, float))
             and not isinstance(v, bool)]
    return [n for n in names if all(n in h[0] for h in histories)]


def x_values(history: list[dict], key: str | None) -> np.ndarray:
    """The history's counter, or 1, 2, ... for a history without one."""
    if key is None:
        return np.arange(1, len(history) + 1)
    return np.array([record[key] for record in history])


SWEEP_STATS = ("n", "mean", "sd", "min", "max")


def is_sweep(document: dict) -> bool:
    return document.get("experiment") == "seeds"


def sweep_metrics(documents: list[dict], wanted: list[str]) -> list[str]:
    """--metrics (checked against every sweep), or the metrics every sweep summarised, in the
    first sweep's order."""
    shared = [name for name in documents[0].get("metrics", {})
              if all(name in d.get("metrics", {}) for d in documents)]
    missing = [name for name in wanted if name not in shared]
    if missing:
        raise ConfigError(f"option --metrics: got {', '.join(missing)}; allowed: the metrics "
                         f"every sweep summarised, {', '.join(shared)}")
    return wanted or shared


def sweep_records(documents: list[dict], labels: list[str], names: list[str]) -> list[dict]:
    """One record per sweep: label, the experiment's options, and {metric: {n, mean, sd, min,
    max}} over its seeds."""
    return [{"label": label,
             "options": " ".join(d.get("config", {}).get("experiment_options", []))
             or "(defaults)",
             "metrics": {name: {stat: d["metrics"][name][stat] for stat in SWEEP_STATS}
                         for name in names}}
            for label, d in zip(labels, documents)]


def per_seed(document: dict, name: str) -> dict[int, float]:
    """{seed: the metric's value} of one sweep, from its history (one record per seed)."""
    return {record["seed"]: record[name] for record in document.get("history", [])
            if name in record}


def differences(documents: list[dict], labels: list[str], names: list[str]) -> list[dict]:
    """Each later sweep against the first, per metric: the difference of the means (later -
    first) with its standard error sqrt(sd_a^2/n_a + sd_b^2/n_b), and over the seeds both
    ran (two at least) the mean per-seed difference with its standard error sd_d/sqrt(n),
    sd with n - 1 in the denominator; None where there are too few seeds for an error."""
    rows = []
    first = documents[0]
    for label, document in zip(labels[1:], documents[1:]):
        for name in names:
            a, b = first["metrics"][name], document["metrics"][name]
            unpaired = (np.sqrt(a["sd"] ** 2 / a["n"] + b["sd"] ** 2 / b["n"])
                        if min(a["n"], b["n"]) > 1 else None)
            seeds_a, seeds_b = per_seed(first, name), per_seed(document, name)
            shared = sorted(set(seeds_a) & set(seeds_b))
            paired = np.array([seeds_b[seed] - seeds_a[seed] for seed in shared])
            rows.append({
                "label": label, "against": labels[0], "metric": name,
                "difference": b["mean"] - a["mean"], "se": unpaired,
                "shared_seeds": len(shared),
                "paired_difference": float(paired.mean()) if len(shared) > 1 else None,
                "paired_se": (float(paired.std(ddof=1) / np.sqrt(len(shared)))
                              if len(shared) > 1 else None)})
    return rows


def difference_table(rows: list[dict]) -> str:
    def plus_minus(value, error):
        return "-" if value is None else (f"{value:+.4g}" if error is None
                                          else f"{value:+.4g} ± {error:.3g}")

    shown = [{"sweep": r["label"], "metric": r["metric"],
              f"mean - {r['against']}'s": plus_minus(r["difference"], r["se"]),
              "paired, shared seeds": plus_minus(r["paired_difference"], r["paired_se"]),
              "shared seeds": r["shared_seeds"]} for r in rows]
    return results.markdown_table(shown, ["sweep", "metric", *list(shown[0])[2:]])


def always_missed(documents: list[dict]) -> list[int] | None:
    """The test examples every seed of every sweep misclassifies (the sweeps'
    "misclassified" counts, experiments.seeds), in order; None unless every sweep has them."""
    if not all("misclassified" in d for d in documents):
        return None
    shared = None
    for document in documents:
        seeds = len(document["config"]["seeds"])
        every = {e["index"] for e in document["misclassified"]["examples"]
                 if e["seeds"] == seeds}
        shared = every if shared is None else shared & every
    return sorted(shared)


def spread(stats: dict) -> str:
    """ "mean ± sd [min, max]" of one metric of one sweep."""
    return (f"{stats['mean']:.4g} ± {stats['sd']:.3g} [{_number(stats['min'])}, "
            f"{_number(stats['max'])}]")


def _number(value: float) -> str:
    return f"{int(value):d}" if float(value).is_integer() else f"{value:.4g}"


def sweep_table(records: list[dict]) -> str:
    names = list(records[0]["metrics"]) if records else []
    rows = [{"sweep": r["label"], "options": r["options"],
             "seeds": next(iter(r["metrics"].values()))["n"] if names else 0,
             **{name: spread(r["metrics"][name]) for name in names}} for r in records]
    return results.markdown_table(rows, ["sweep", "options", "seeds", *names])


def labels_for(directories: list[pathlib.Path]) -> list[str]:
    """Short distinct labels: the last path components that tell the runs apart."""
    parts = [d.absolute().parts for d in directories]
    for depth in range(1, max(len(p) for p in parts) + 1):
        labels = ["/".join(p[-depth:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    return [str(d) for d in directories]


def check_workdir(workdir: pathlib.Path) -> None:
    """Refuse a --workdir that holds another experiment's results (one of the runs compared,
    say): its results.json would be overwritten by the comparison's."""
    path = workdir / "results.json"
    if not path.is_file():
        return
    try:
        experiment = json.loads(path.read_text()).get("experiment", EXPERIMENT)
    except (OSError, ValueError, AttributeError):  # not a results.json this project wrote
        experiment = None
    if experiment != EXPERIMENT:
        raise ConfigError(f"option --workdir: {path} holds the results of "
                          + (f"a run of {experiment}" if experiment else "something else")
                          + ", which the comparison would overwrite; choose another --workdir")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=pathlib.Path, help="run directories")
    parser.add_argument("--workdir", type=pathlib.Path, default=None,
                        help="where to write the comparison (default: runs/compare/<time>/)")
    parser.add_argument("--metrics", default="",
                        help="comma-separated metric names to show (default: all shared)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    documents = [results.read_results(directory) for directory in args.runs]
    labels = labels_for(args.runs)
    workdir = args.workdir or results.default_workdir(EXPERIMENT)
    check_workdir(workdir)

    requested = [m for m in args.metrics.split(",") if m]
    sweeps = missed = against_first = None
    if all(is_sweep(document) for document in documents):
        names = sweep_metrics(documents, requested)
        sweeps = sweep_records(documents, labels, names)
        missed = always_missed(documents)
        against_first = differences(documents, labels, names)
        requested = [f"{name}.{stat}" for name in names for stat in SWEEP_STATS]
    flat = [flatten(document.get("metrics", {})) for document in documents]
    known = sorted(set().union(*flat))
    unknown = [name for name in requested if name not in known]
    if unknown:  # a misspelt name would be a row of "-"
        raise ConfigError(f"option --metrics: got {', '.join(unknown)}; allowed: the metrics "
                          f"of the runs, {', '.join(known)}")
    wanted = requested or known
    table = {name: [f.get(name) for f in flat] for name in wanted}
    histories = [document.get("history", []) for document in documents]
    curves, x_key = shared_curves(histories), counter(histories)
    workdir.mkdir(parents=True, exist_ok=True)  # once the options are checked
    if sweeps is not None:
        plots.save_spreads(workdir / "compare.png", [
            {"xlabel": name, "rows": {label: [record[name] for record in history]
                                      for label, history in zip(labels, histories)}}
            for name in names], title="sweeps compared: each seed, and mean +- sd")
    elif curves:
        plots.save_curves(workdir / "compare.png", [
            {"ylabel": name, "xlabel": x_key or "record",
             "log": name.endswith("energy") or name.endswith("loss"),
             "series": {label: (x_values(history, x_key),
                                np.array([r[name] for r in history], dtype=float))
                        for label, history in zip(labels, histories)}}
            for name in curves], title="runs compared")
    # The keys every experiment writes (README, "Experiments"; no history of its own), then
    # the comparison's.
    results.write_results(
        workdir, EXPERIMENT, {"runs": [str(d) for d in args.runs], "metrics": args.metrics},
        table, [], {"run": time.perf_counter() - started},
        runs=[str(d) for d in args.runs], labels=labels,
        experiments=[document.get("experiment") for document in documents], curves=curves,
        **({"sweeps": sweeps, "differences": against_first} if sweeps is not None else {}),
        **({"missed_by_every_run": missed} if sweeps is not None and missed is not None
           else {}))
    if sweeps is not None:
        text = sweep_table(sweeps)
        if against_first:
            text += ("\nAgainst the first sweep (± one standard error; the paired column over "
                     "the seeds both ran):\n\n" + difference_table(against_first))
        if missed is not None:
            text += (f"\n{len(missed)} test examples are misclassified by every seed of every "
                     f"sweep (results.json \"missed_by_every_run\")\n")
    else:
        rows = [{"metric": name, **dict(zip(labels, values))} for name, values in table.items()]
        text = results.markdown_table(rows, ["metric", *labels])
    if sweeps is not None:
        text += f"\neach seed's {', '.join(names)}, and mean +- sd, in {workdir / 'compare.png'}\n"
    else:
        text += (f"\ncurves of {', '.join(curves) or 'nothing shared'} in "
                 f"{workdir / 'compare.png'}\n")
    results.save_and_print_table(workdir, text)
    return 0


if __name__ == "__main__":
    run_main(main, EXPERIMENT, extra_errors=(FileNotFoundError,))
