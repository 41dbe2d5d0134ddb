"""Local optima made visible: a 2-2-1 sigmoid net on XOR from 100 random initialisations.

    python -m experiments.xor_restarts [--workdir DIR] [--inits 100] [--restarts 5]
        [--steps 5000] [--lr 2.0] [--init-scale 2.4] [--perturbation 1e-3,1e-2,0.1,1,3,10]

The lecture's challenge "local optima" on the smallest problem that has them: XOR (4 points,
targets 0/1), a 2-2-1 net with sigmoid hidden units and a sigmoid output (the net returns the
logit), the lecture's objective E (sigmoid cross-entropy, lambda = 0 by default), the
hand-written backward pass (the manual engine). From the same 100 initial parameter sets
(weights U(-s/sqrt(F), s/sqrt(F)) with s = --init-scale and F the fan-in, biases 0), vmapped
over the initialisations, one jitted call per procedure:

(a) plain full-batch gradient descent, every step kept;
(b) the lecture's cost-checked descent: a step that does not lower E is undone and replaced by
    a random perturbation params + scale * N(0, 1), at each scale of --perturbation (vmapped
    over the scales too; the first scale is the one in the headline metrics);
(c) random restarts: the 100 initialisations grouped into 20 trials of R = 5 consecutive ones,
    each trial keeping the restart with the lowest final E of the plain runs (the lecture picks
    on held-out data; XOR has only its 4 points, so here the held-out set is the training set);
(d) restarts and perturbation together: the same choice among the cost-checked runs.

A run "ends in a local minimum" (a failure) when its final E is above --threshold (0.1). The
global minimum is E -> 0; the stuck runs sit at E = ln 2 / 2 = 0.347 (one point fitted per
class, the other two merged at output 1/2) or at E = (3 ln 3 - 2 ln 2) / 4 = 0.477 (one point
fitted, three merged at output 2/3: the value we measured, rather than the 2 ln 2 / 3 = 0.462
sometimes quoted). "Solved" means all 4 points classified correctly (logit > 0 <=> target 1).
Every run uses the whole --steps budget: the default --stop-tolerance 0 switches the lecture's
stopping rule off, so that the perturbation rule gets every chance to act.

Writes results.json (the README's keys; metrics failure_rate_{plain, perturbed, restarts,
restarts_perturbed}, solved rates, the same per perturbation scale, "rescued" counts; history:
median E and the fraction of runs above the threshold, at about 200 steps; "runs": for each
procedure and initialisation the final E, solved flag, perturbation count, stop step, final
parameters and restart trials, plus the initial parameters), results.md (the table),
histogram.png (log10 final E: plain, perturbed at the first and the largest scale, restarts;
threshold line) and curves.png (median E and fraction above the threshold against step).

Measured on the 2-core CPU (jax 0.10.2, defaults), 9-14 s in all (compile 4.5-8.5 s, run 2-3 s):
- plain descent fails on 28 of the 100 (26 at 0.347, 2 at 0.477). 2,000 or 20,000 steps give
  the same 28, and lr 0.5 (20,000 steps) 29, so they are stuck, not slow. (Init scale 1.0 gives
  5 failures, 4.0 gives 37, lr 5.0 gives 20: the failure rate depends on the settings, its
  existence does not.)
- the cost-checked descent fails on the same 28 at scales 1e-3, 1e-2, 0.1, 1 and 3, and on 25
  at scale 10 (3 rescued, no run made worse). Near those minima E keeps falling by ~1e-8 a step,
  so a step is seldom undone: 344 perturbations over all runs at 1e-3, 27-47 at scales >= 1
  (after a large kick descent runs straight back down for thousands of steps). With 20,000
  steps scale 1e-3 undoes 117,483 steps and still rescues none; scale 3 rescues 6 of 28.
- with a larger step the cost check hurts: at --lr 5 plain descent fails on 20 and the
  cost-checked descent on 57 (1e-3; 37 runs worsened, none rescued), 41, 26, 33, 35 and 37
  (scale 10); at --lr 10 on all 100 at 1e-3 (plain: 49). A step that overshoots is undone,
  the weights move by the small perturbation, and the same overshooting step is proposed
  again, so the run stalls; the rule has no step-size reduction.
- restarts with R = 5 bring the failures to 0 of 20 trials, with or without perturbation
  (0.28^5 = 0.17% per trial if runs failed independently).
With the lecture's stopping rule on (--stop-tolerance 1e-5) the stuck cost-checked runs stop
after 3,200-5,000 steps, with the same failures at scales up to 3 and 26 at scale 10; a run can
then stop right after a kick, at a point worse than its best (E up to 11 at scale 10), since
the procedure returns its last parameters, not its best.
"""
from __future__ import annotations

import dataclasses
import math
import operator

import jax
import jax.numpy as jnp
import numpy as np

import nets
from nets import initializers
from training import optim, plots, procedures, results, timing
from training.config import ConfigError, option, parse, run_main, to_dict
from training.harness import open_run

EXPERIMENT = "xor_restarts"

XOR_INPUTS = np.array([[0, 0], [0, 1], [1, 0], [1, 1]], np.float32)
XOR_TARGETS = np.array([[0], [1], [1], [0]], np.float32)

# Where the stuck runs of the 2-2-1 sigmoid net sit under the mean cross-entropy (read off their
# outputs): one point of each class fitted and the other two merged at output 1/2 gives
# 2 ln 2 / 4; one point fitted and the other three merged at their mean target 2/3 gives
# (2 ln(3/2) + ln 3) / 4 = (3 ln 3 - 2 ln 2) / 4. Both are approached from above as the weights
# grow, never reached.
LOCAL_MINIMA = {"ln2/2": math.log(2) / 2,
                "(3ln3-2ln2)/4": (3 * math.log(3) - 2 * math.log(2)) / 4}


@dataclasses.dataclass(frozen=True)
class Config:
    seed: int = option(0, "seed of the initialisations and perturbations", ge=0)
    inits: int = option(100, "random initialisations (a multiple of --restarts)", ge=1)
    restarts: int = option(5, "R, initialisations per restart trial", ge=1)
    steps: int = option(5000, "gradient-descent steps per run", ge=1)
    lr: float = option(2.0, "learning rate eta", gt=0)
    l2: float = option(0.0, "lambda of the L2 penalty", ge=0)
    init_scale: float = option(2.4, "weights U(-s/sqrt(fan_in), s/sqrt(fan_in))", gt=0)
    perturbation: tuple[float, ...] = option(
        (1e-3, 1e-2, 0.1, 1.0, 3.0, 10.0),
        "perturbation scales of the cost-checked descent, comma-separated; the first is the "
        "one in the headline metrics", gt=0)
    threshold: float = option(0.1, "final E above this is a local minimum (failure)", gt=0)
    stop_window: int = option(50, "steps of the stopping rule's window", ge=1)
    stop_tolerance: float = option(0.0, "the lecture's stopping rule; 0 runs every step",
                                   ge=0, finite=False)
    engine: str = option("manual", "gradient engine", choices=tuple(nets.engines.ENGINES))


def parse_args(argv=None):
    """(config, harness args), with the checks that involve two options."""
    config, args = parse(Config, argv, __doc__, prog=f"python -m experiments.{EXPERIMENT}")
    if config.inits % config.restarts:
        raise ConfigError(f"option --inits: got {config.inits}; allowed: a multiple of "
                          f"--restarts ({config.restarts})")
    if len({f"{scale:g}" for scale in config.perturbation}) != len(config.perturbation):
        raise ConfigError(f"option --perturbation: got {config.perturbation}; allowed: "
                          "distinct scales")
    return config, args


def build_model(init_scale: float) -> nets.Layer:
    """The 2-2-1 sigmoid net returning the output logit: x (batch, 2) -> z (batch, 1)."""
    return nets.build_mlp(2, 1, hidden_units=2,
                          w_init=initializers.fan_in_uniform(init_scale))


def solves_xor(model, params, x, targets) -> jax.Array:
    """True when every point is classified correctly: logit > 0 <=> target 1."""
    logits = model.apply(params, x)
    return jnp.all((logits > 0) == (targets > 0.5))


def train_runs(model, objective, keys, config, scales=None):
    """Every initialisation trained by one procedure, vmapped, in one jitted call.

    keys: (inits,) PRNG keys; each is split into an initialisation key and a training key (the
    perturbations' noise), so every procedure starts from the same parameters and every
    perturbation scale sees the same noise.
    scales None: `full_batch_descent`, results with a leading (inits,) axis.
    scales (scales,): `cost_checked_descent` at each perturbation scale, vmapped over the
    scales too (the scale is a traced float32, so one compilation serves them all); results
    with leading (scales, inits) axes.
    Returns ((initial_params, TrainResult, solved), {"compile": s, "run": s}).
    """
    x, targets = jnp.asarray(XOR_INPUTS), jnp.asarray(XOR_TARGETS)
    engine = nets.get_engine(config["engine"])
    optimizer = optim.gradient_descent(config["lr"])
    common = {"steps": config["steps"], "engine": engine, "stop_window": config["stop_window"],
              "stop_tolerance": config["stop_tolerance"]}

    def one_run(key, scale=None):
        init_key, train_key = jax.random.split(key)
        params = model.init(init_key, (-1, x.shape[1]))[1]
        if scale is None:
            result = procedures.full_batch_descent(
                model, objective, optimizer, params, x, targets, **common)
        else:
            result = procedures.cost_checked_descent(
                model, objective, optimizer, params, x, targets, key=train_key,
                perturbation_scale=scale, **common)
        return params, result, solves_xor(model, result.params, x, targets)

    if scales is None:
        return timing.compile_and_run(jax.vmap(one_run), keys)
    runs_per_scale = jax.vmap(one_run, in_axes=(0, None))
    return timing.compile_and_run(jax.vmap(runs_per_scale, in_axes=(None, 0)), keys,
                                  jnp.asarray(scales, jnp.float32))


def keep_best_of_restarts(final_energies: np.ndarray, restarts: int) -> np.ndarray:
    """Index of the run kept in each trial of `restarts` consecutive runs: the lowest final E.

    final_energies: (inits,) with inits a multiple of restarts. Returns (inits // restarts,)
    indices into final_energies; ties go to the first run of the trial.
    """
    trials = final_energies.reshape(-1, restarts)
    return np.arange(trials.shape[0]) * restarts + np.argmin(trials, axis=1)


def params_record(model, params) -> dict:
    """{layer name: {"w": ..., "b": ...}} for the layers that have parameters."""
    return {layer.name: dict(layer_params)
            for layer, layer_params in zip(model.sublayers, params) if layer_params}


def near_local_minimum(energy: float, tolerance: float = 0.02) -> str:
    """The name of the known local minimum within `tolerance` of energy, or "other"."""
    for name, value in LOCAL_MINIMA.items():
        if abs(energy - value) <= tolerance:
            return name
    return "other"


def summary_row(procedure, energies, solved, perturbations, threshold):
    failures = int(np.sum(energies > threshold))
    return {"procedure": procedure, "runs": len(energies), "failures": failures,
            "failure rate": failures / len(energies), "solved rate": float(np.mean(solved)),
            "mean final E": float(np.mean(energies)), "perturbations": int(np.sum(perturbations))}


def history_from(energy_curves: dict, threshold: float, steps: int) -> list[dict]:
    """Median E and fraction of runs above threshold after subsampled steps (1-based)."""
    stride = max(1, steps // 200)
    picked = sorted(set(range(stride - 1, steps, stride)) | {steps - 1})
    return [{"step": t + 1,
             "median_energy": {name: float(np.median(curves[:, t]))
                               for name, curves in energy_curves.items()},
             "fraction_above_threshold": {name: float(np.mean(curves[:, t] > threshold))
                                          for name, curves in energy_curves.items()}}
            for t in picked]


def train_all(model, objective, keys, config):
    """Plain descent, then the cost-checked descent at every scale: two jitted calls.

    Returns (initial_params, {procedure name: (TrainResult, solved)}, seconds), each result
    with a leading (inits,) axis; names are "plain" and "perturbed_<scale>".
    """
    (initial_params, plain, solved), plain_seconds = train_runs(model, objective, keys, config)
    (_, perturbed, perturbed_solved), perturbed_seconds = train_runs(
        model, objective, keys, config, config["perturbation"])
    outcomes = {"plain": (plain, solved)}
    for index, scale in enumerate(config["perturbation"]):
        outcomes[f"perturbed_{scale:g}"] = (jax.tree.map(operator.itemgetter(index), perturbed),
                                            perturbed_solved[index])
    seconds = {phase: plain_seconds[phase] + perturbed_seconds[phase]
               for phase in ("compile", "run")}
    seconds["by_procedure"] = {"plain": plain_seconds, "cost_checked": perturbed_seconds}
    return initial_params, outcomes, seconds


def summarize(model, outcomes, threshold, restarts):
    """Table rows (each procedure, then its restart trials), per-run records, E curves.

    "rescued": runs that plain descent leaves above the threshold and this procedure, from the
    same initialisation, brings below it; "worsened": the other way round.
    """
    rows, runs, energy_curves = {}, {}, {}
    plain_failed = np.asarray(outcomes["plain"][0].history["energy"])[:, -1] > threshold
    for name, (result, solved) in outcomes.items():
        curves = np.asarray(result.history["energy"])
        energies, solved = curves[:, -1], np.asarray(solved)
        perturbations = np.asarray(result.perturbations)
        kept = keep_best_of_restarts(energies, restarts)
        label = "plain GD" if name == "plain" else f"perturbation {scale_of(name)}"
        kept_label = f"restarts (R={restarts})" + ("" if name == "plain" else f" + {label}")
        rows[name] = summary_row(label, energies, solved, perturbations, threshold)
        if name != "plain":
            rows[name]["rescued"] = int(np.sum(plain_failed & (energies <= threshold)))
            rows[name]["worsened"] = int(np.sum(~plain_failed & (energies > threshold)))
        rows[f"restarts_{name}"] = summary_row(kept_label, energies[kept], solved[kept],
                                               perturbations[kept], threshold)
        energy_curves[name] = curves
        runs[name] = {
            "final_energy": energies, "solved": solved, "perturbations": perturbations,
            "stop_step": np.asarray(result.stop_step),
            "final_params": params_record(model, result.params),
            "restart_trials": {"kept_index": kept, "final_energy": energies[kept]},
        }
    return rows, runs, energy_curves


def headline_metrics(rows, runs, config):
    first = f"perturbed_{config['perturbation'][0]:g}"
    scales = [f"{scale:g}" for scale in config["perturbation"]]
    plain_energies = runs["plain"]["final_energy"]
    stuck = plain_energies[plain_energies > config["threshold"]]
    return {
        "failure_rate_plain": rows["plain"]["failure rate"],
        "failure_rate_perturbed": rows[first]["failure rate"],
        "failure_rate_restarts": rows["restarts_plain"]["failure rate"],
        "failure_rate_restarts_perturbed": rows[f"restarts_{first}"]["failure rate"],
        "solved_rate_plain": rows["plain"]["solved rate"],
        "solved_rate_perturbed": rows[first]["solved rate"],
        "solved_rate_restarts": rows["restarts_plain"]["solved rate"],
        "solved_rate_restarts_perturbed": rows[f"restarts_{first}"]["solved rate"],
        "perturbation_scale": config["perturbation"][0],
        "failure_rate_perturbed_by_scale": {
            scale: rows[f"perturbed_{scale}"]["failure rate"] for scale in scales},
        "failure_rate_restarts_perturbed_by_scale": {
            scale: rows[f"restarts_perturbed_{scale}"]["failure rate"] for scale in scales},
        "rescued_by_scale": {scale: rows[f"perturbed_{scale}"]["rescued"] for scale in scales},
        "worsened_by_scale": {scale: rows[f"perturbed_{scale}"]["worsened"] for scale in scales},
        "perturbations_by_scale": {
            scale: rows[f"perturbed_{scale}"]["perturbations"] for scale in scales},
        # If runs failed independently with the plain rate p, a trial of R fails with p^R.
        "expected_failure_rate_restarts_if_independent":
            rows["plain"]["failure rate"] ** config["restarts"],
        "plain_failures_near": {name: int(sum(near_local_minimum(e) == name for e in stuck))
                                for name in [*LOCAL_MINIMA, "other"]},
        "inits": config["inits"], "trials": config["inits"] // config["restarts"],
        "threshold": config["threshold"],
    }


def main(argv=None):
    args, harness_args = parse_args(argv)
    config = to_dict(args)
    workdir = open_run(EXPERIMENT, args, harness_args).workdir
    model = build_model(args.init_scale)
    objective = nets.lecture_objective(args.l2)
    keys = jax.random.split(jax.random.key(args.seed), args.inits)

    initial_params, outcomes, seconds = train_all(model, objective, keys, config)
    rows, runs, energy_curves = summarize(model, outcomes, args.threshold, args.restarts)
    runs["initial_params"] = params_record(model, initial_params)
    metrics_out = headline_metrics(rows, runs, config)
    history = history_from(energy_curves, args.threshold, args.steps)
    results.write_results(workdir, EXPERIMENT, config, metrics_out, history, seconds,
                          runs=runs, table=list(rows.values()))
    save_plots(workdir, runs, energy_curves, args)
    text = render(list(rows.values()), metrics_out, seconds, args, workdir)
    results.save_and_print_table(workdir, text)
    return metrics_out


def scale_of(name: str) -> str:
    return name.removeprefix("perturbed_")


def save_plots(workdir, runs, energy_curves, args):
    def log10(values):
        # E is a mean of positive cross-entropies: > 0, but it can round to 0 in float32.
        return np.log10(np.maximum(np.asarray(values, np.float64), 1e-12))

    scales = sorted({args.perturbation[0], max(args.perturbation)})
    plots.save_histogram(
        workdir / "histogram.png",
        {"plain GD": log10(runs["plain"]["final_energy"]),
         **{f"cost-checked, perturbation {s:g}": log10(runs[f"perturbed_{s:g}"]["final_energy"])
            for s in scales},
         f"restarts R={args.restarts} (kept run of each trial)":
             log10(runs["plain"]["restart_trials"]["final_energy"])},
        xlabel="log10 final E", threshold=math.log10(args.threshold),
        title=f"XOR 2-2-1: final E of {args.inits} initialisations, {args.steps} steps, "
              f"lr {args.lr:g}",
    )
    steps = np.arange(1, args.steps + 1)
    plots.save_curves(workdir / "curves.png", [
        {"ylabel": "median E over the runs", "log": True,
         "series": {name: (steps, np.median(curves, axis=0))
                    for name, curves in energy_curves.items()}},
        {"ylabel": f"fraction of runs with E > {args.threshold:g}",
         "series": {name: (steps, np.mean(curves > args.threshold, axis=0))
                    for name, curves in energy_curves.items()}},
    ], title="XOR: plain vs cost-checked gradient descent")


def render(rows, metrics_out, seconds, args, workdir):
    columns = ["procedure", "runs", "failures", "failure rate", "solved rate", "mean final E",
               "perturbations", "rescued", "worsened"]
    near = ", ".join(f"{count} near E = {name}" for name, count in
                     metrics_out["plain_failures_near"].items())
    return "\n\n".join([
        f"## XOR 2-2-1 sigmoid net: {args.inits} initialisations, {args.steps} steps, "
        f"lr {args.lr:g}, init scale {args.init_scale:g}, engine {args.engine}",
        f"Failure: final E > {args.threshold:g}. Restarts keep the lowest final E of each trial "
        f"of {args.restarts} (on XOR the held-out set is the training set itself).",
        results.markdown_table(rows, columns).rstrip("\n"),
        f"Plain failures: {near}. If runs failed independently, a trial of {args.restarts} "
        f"would fail with probability "
        f"{metrics_out['expected_failure_rate_restarts_if_independent']:.2e}.",
        f"compile {seconds['compile']:.1f} s, run {seconds['run']:.1f} s. Results in {workdir}",
    ]) + "\n"


if __name__ == "__main__":
    run_main(main, EXPERIMENT)
