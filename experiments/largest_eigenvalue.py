"""The largest eigenvalue of the curvature, by hand-written Gauss-Newton products, and the
step size it allows (LeCun, Simard and Pearlmutter 1993; LeCun et al. 1998, "Efficient
BackProp", section 5).

    python -m experiments.largest_eigenvalue [--workdir DIR] [--model lenet1989|mlp]
        [--examples 1000] [--iterations 30] [--negative-iterations 200]
        [--lanczos-iterations 30] [--steps 100] [--factors 0.5,1,2,4,8,16,32,64]

On a quadratic E with Hessian H, gradient descent with step eta converges along every
eigenvector iff eta < 2 / lambda_max, fastest at 1 / lambda_max. This experiment
1. estimates lambda_max of the Gauss-Newton matrix G = J^T H_loss J of LeNet-1989's
   objective (the 1989 recipe: tanh, squared error against +-1, its initial weights) on the
   first `--examples` USPS training digits, by power iteration v <- G v / |G v| with G v
   computed by hand (`nets.engines.gauss_newton_product`: the layers' tangent passes for
   J v, the loss's Hessian, the backward passes for J^T);
2. repeats the power iteration with G v from jax (`jax.jvp` and `jax.vjp` of the forward
   pass, `jax.jvp` of the loss's `jax.grad`), from the same start, and with the exact
   Hessian's product, by hand (`nets.engines.hessian_product`, Pearlmutter's R-operator
   through the backward passes) and by jax (`jax.jvp` of `jax.grad` of E); then the
   Hessian's most negative eigenvalue, by power iteration with H - lambda_max(H) I (by
   hand), whose dominant eigenvalue is lambda_min(H) - lambda_max(H) (G has none below 0);
   and reports the largest entry of LeCun's backpropagated diagonal beside them (a lower
   bound of lambda_max when exact); and both ends of G's and H's spectra at once by
   `--lanczos-iterations` Lanczos steps from the same start (`training.procedures.lanczos`,
   the hand-written products), their extreme Ritz values after every step;
3. runs full-batch gradient descent (manual engine) at eta = c / lambda_max for each
   factor c, re-estimating lambda_max every `--track-every` steps with a few power
   iterations warm-started from the last vector: the curvature the run meets, against the
   2 / eta that a quadratic would allow ("the edge of stability", Cohen et al. 2021).

Writes results.json (metrics: the three eigenvalue estimates, their agreement, the last
loss per factor; "runs": the loss and lambda_max histories), results.md and
largest_eigenvalue.png (power iterations; loss against step per factor; lambda_max against
step beside 2 / eta).

Measured on the 2-core CPU (jax 0.10.2, 2026-12-06), defaults (float32, seed 0; 56 s):
lambda_max of G 123.03 after 30 iterations by hand and by jax's products (within 3.1e-7 at
every iteration; 0.43 s against 2.44 s for the 30 products, compiled), the Hessian's 111.83
by hand and by jax (within 4.1e-7; 1.00 s against 4.30 s), its most negative eigenvalue
-51.76 (-47.18 after 30 shifted iterations, -51.71 after 100, -51.76 after 150), the largest
entry of LeCun's diagonal 0.78. Lanczos from the same start (a later run the same day):
H's extremes 111.83 and -51.76 after 30 steps (0.96 s, compiled), within 0.01 of them
after 9 and 17 products, where the power iterations needed 16 and then 131 more; G's
largest 123.03 after 8, its smallest Ritz value 0.002 (G is positive semi-definite). So at
the initial weights H has a direction of negative curvature about half as steep as its
steepest positive one, which G, positive semi-definite, does not show. lambda_max falls to
16-49 within 10 steps at every c; the loss after 100 steps (6.11 at the start): c = 0.5, 1,
2, 4, 8, 16: 1.471, 1.190, 0.907, 0.658, 0.469, 0.370 (lambda_max then 9-10, under 2 / eta =
15.4); c = 32 and 64 stall at 1.613 and 1.976 (1.600 and 1.995 in the later run, the others
equal to the third decimal), the tanh units saturated (lambda_max 0.5-3).
"""
from __future__ import annotations

import dataclasses
import time

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np

import nets
from nets import gradcheck, models
from nets.engines import curvature_diagonal, gauss_newton_product, hessian_product
from training import data, plots, procedures, results
from training.config import option, parse, run_main
from training.harness import open_run

EXPERIMENT = "largest_eigenvalue"
MODELS = ("lenet1989", "mlp")


@dataclasses.dataclass(frozen=True)
class Config:
    model: str = option("lenet1989", "the net: LeNet-1989 or a 256-30-10 tanh MLP",
                        choices=MODELS)
    examples: int = option(1000, "first USPS training digits: the full batch", ge=1, le=7291)
    iterations: int = option(30, "power iterations for lambda_max at the initial point", ge=1)
    negative_iterations: int = option(200, "power iterations for the Hessian's most negative "
                                           "eigenvalue (H shifted by its lambda_max)", ge=1)
    steps: int = option(100, "full-batch gradient-descent steps per factor", ge=0)
    factors: tuple[float, ...] = option((0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0),
                                        "comma-separated c: steps eta = c / lambda_max", gt=0)
    track_every: int = option(10, "re-estimate lambda_max every this many steps", ge=1)
    track_iterations: int = option(5, "warm-started power iterations per re-estimate", ge=1)
    lanczos_iterations: int = option(30, "Lanczos iterations for both ends of G's and H's "
                                         "spectra", ge=1)
    seed: int = option(0, "seed of the initial weights and the power iteration's start", ge=0)


def build(config: Config):
    """(model, objective, x (n, ...), targets (n, 10) in +-1): the 1989 recipe's net and
    squared error, or a tanh MLP on the flattened digits."""
    images, labels = data.load_usps("train")
    images, labels = images[:config.examples], labels[:config.examples]
    targets = jnp.asarray(2 * data.one_hot(labels, 10) - 1)
    objective = nets.Objective(nets.mean_squared_error(), 0.0)
    if config.model == "lenet1989":
        return (models.lenet1989(implementation="patches"), objective,
                jnp.asarray(images.reshape(-1, 16, 16, 1)), targets)
    model = nets.build_mlp(256, 10, hidden_units=30, activation="tanh",
                           output_activation="tanh")
    return model, objective, jnp.asarray(images), targets


def _dot(a, b) -> jax.Array:
    return sum(jnp.vdot(u, v) for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _normalised(v):
    norm = jnp.sqrt(_dot(v, v))
    return jax.tree.map(lambda leaf: leaf / norm, v)


def shifted(product, shift: float):
    """(params, x, targets, v) -> product(...) - shift v: the matrix A - shift I."""

    def shifted_product(params, x, targets, v):
        return jax.tree.map(lambda av, leaf: av - shift * leaf,
                            product(params, x, targets, v), v)

    return shifted_product


def power_iteration(product, iterations: int):
    """A jitted `(params, x, targets, v) -> (estimates, v)`: the Rayleigh quotient v^T A v of
    each of `iterations` steps v <- A v / |A v| (|v| = 1) as one `lax.scan`, and the last v."""

    def step(carry, _):
        params, x, targets, v = carry
        av = product(params, x, targets, v)
        return (params, x, targets, _normalised(av)), _dot(v, av)

    @jax.jit
    def run(params, x, targets, v):
        carry, estimates = jax.lax.scan(step, (params, x, targets, _normalised(v)),
                                        length=iterations)
        return estimates, carry[3]

    return run


def lanczos_extremes(product, iterations: int):
    """A `(params, x, targets, v) -> (smallest, largest)`: after each of `iterations` Lanczos
    steps from v (`training.procedures.lanczos`, full reorthogonalisation, one product a
    step), the smallest and largest Ritz value of A (eigenvalues of T's leading block, in
    float64). The largest is at least the Rayleigh quotient of any vector of the Krylov
    subspace, so at least the power iteration's estimate after as many products."""

    @jax.jit
    def tridiagonal(params, x, targets, v):
        flat, unravel = jax.flatten_util.ravel_pytree(v)

        def matvec(u):
            return jax.flatten_util.ravel_pytree(product(params, x, targets, unravel(u)))[0]

        found = procedures.lanczos(matvec, flat, iterations)
        return found.tridiagonal, found.dimension

    def run(params, x, targets, v):
        t, dimension = tridiagonal(params, x, targets, v)
        t = np.asarray(t, np.float64)
        ends = np.array([np.linalg.eigvalsh(t[:j, :j])[[0, -1]]
                         for j in range(1, int(dimension) + 1)])
        return ends[:, 0], ends[:, 1]

    return run


def descend(model, objective, params, x, targets, v, eta: float, config: Config):
    """Full-batch gradient descent at step eta for config.steps steps: the loss before every
    step and after the last, and (step, lambda_max) every track_every steps."""
    value_and_grad = nets.manual(model, objective)
    track = power_iteration(gauss_newton_product(model, objective), config.track_iterations)

    @jax.jit
    def chunk(params):
        def step(params, _):
            value, grads = value_and_grad(params, x, targets)
            return jax.tree.map(lambda p, g: p - eta * g, params, grads), value
        return jax.lax.scan(step, params, length=config.track_every)

    losses, sharpness = [], []
    for start in range(0, config.steps, config.track_every):
        estimates, v = track(params, x, targets, v)
        sharpness.append((start, float(estimates[-1])))
        params, values = chunk(params)
        losses += [float(value) for value in values]
        if not np.isfinite(losses[-1]):
            break
    losses = losses[:config.steps]
    losses.append(float(value_and_grad(params, x, targets)[0]))
    return losses, sharpness


def plot(path, estimates: dict, runs: list[dict]) -> None:
    iterations = {name: (np.arange(1, len(values) + 1), values)
                  for name, values in estimates.items()}
    panels = [{"ylabel": "Rayleigh quotient", "xlabel": "power iteration",
               "series": iterations}]
    if runs:
        panels.append({"ylabel": "loss (full batch)", "log": True, "series": {
            f"c = {run['factor']}": (np.arange(len(run["losses"])),
                                     np.minimum(run["losses"], 1e6)) for run in runs}})
        series = {}
        for run in runs:
            steps, values = zip(*run["sharpness"]) if run["sharpness"] else ((), ())
            series[f"c = {run['factor']}"] = (steps, values)
            series[f"2 / eta, c = {run['factor']}"] = ((0, len(run["losses"]) - 1),
                                                       (run["two_over_eta"],) * 2)
        panels.append({"ylabel": "lambda_max of G", "log": True, "series": series})
    plots.save_curves(path, panels, title="largest eigenvalue and the step size")


def main(argv=None):
    config, args = parse(Config, argv, __doc__, prog=f"python -m experiments.{EXPERIMENT}")
    run = open_run(EXPERIMENT, config, args)
    model, objective, x, targets = build(config)
    init_key, start_key = jax.random.split(jax.random.key(config.seed))
    params = model.init(init_key, (-1, *x.shape[1:]))[1]
    leaves, tree = jax.tree.flatten(params)
    start = jax.tree.unflatten(tree, [
        jax.random.normal(key, leaf.shape, leaf.dtype)
        for key, leaf in zip(jax.random.split(start_key, len(leaves)), leaves)])

    seconds, estimates = {}, {}
    for name, product in (
            ("manual_gauss_newton", gauss_newton_product(model, objective)),
            ("jax_gauss_newton", gradcheck.gauss_newton_product_reference(model, objective)),
            ("manual_hessian", hessian_product(model, objective)),
            ("jax_hessian", gradcheck.hessian_product_reference(model, objective))):
        iterate = power_iteration(product, config.iterations)
        began = time.perf_counter()
        estimates[name], v_max = jax.block_until_ready(iterate(params, x, targets, start))
        seconds[f"{name}_first_call"] = time.perf_counter() - began
        began = time.perf_counter()
        jax.block_until_ready(iterate(params, x, targets, start))  # compiled: the run alone
        seconds[f"{name}_run"] = time.perf_counter() - began
        estimates[name] = np.asarray(estimates[name])
        if name == "manual_gauss_newton":
            top_vector = v_max
    top_hessian = float(estimates["manual_hessian"][-1])
    below = power_iteration(shifted(hessian_product(model, objective), top_hessian),
                            config.negative_iterations)
    estimates["manual_hessian_most_negative"] = np.asarray(
        below(params, x, targets, start)[0]) + top_hessian
    for name, product in (("gauss_newton", gauss_newton_product(model, objective)),
                          ("hessian", hessian_product(model, objective))):
        extremes = lanczos_extremes(product, config.lanczos_iterations)
        began = time.perf_counter()
        smallest, largest = extremes(params, x, targets, start)
        seconds[f"lanczos_{name}_first_call"] = time.perf_counter() - began
        began = time.perf_counter()
        extremes(params, x, targets, start)
        seconds[f"lanczos_{name}_run"] = time.perf_counter() - began
        estimates[f"lanczos_{name}_largest"] = largest
        estimates[f"lanczos_{name}_smallest"] = smallest
    diagonal = curvature_diagonal(model, objective)(params, x, targets)
    lambda_max = float(estimates["manual_gauss_newton"][-1])
    manual, reference = estimates["manual_gauss_newton"], estimates["jax_gauss_newton"]

    runs = []
    began = time.perf_counter()
    for factor in config.factors if config.steps else ():
        eta = factor / lambda_max
        losses, sharpness = descend(model, objective, params, x, targets, top_vector, eta,
                                    config)
        runs.append({"factor": factor, "eta": eta, "two_over_eta": 2 / eta, "losses": losses,
                     "sharpness": sharpness, "last_loss": losses[-1],
                     "diverged": not np.isfinite(losses[-1]) or losses[-1] > losses[0]})
    seconds["descent"] = time.perf_counter() - began

    metrics = {
        "lambda_max_gauss_newton": lambda_max,
        "lambda_max_gauss_newton_jax": float(reference[-1]),
        "lambda_max_hessian": top_hessian,
        "lambda_max_hessian_jax": float(estimates["jax_hessian"][-1]),
        "hessian_manual_vs_jax_max_relative": float(np.max(
            np.abs(estimates["manual_hessian"] - estimates["jax_hessian"])
            / np.abs(estimates["jax_hessian"]))),
        "lambda_min_hessian": float(estimates["manual_hessian_most_negative"][-1]),
        **{f"lanczos_{name}_{end}": float(estimates[f"lanczos_{name}_{end}"][-1])
           for name in ("gauss_newton", "hessian") for end in ("largest", "smallest")},
        "manual_vs_jax_max_relative": float(np.max(np.abs(manual - reference)
                                                   / np.abs(reference))),
        "max_backpropagated_diagonal": float(max(jnp.max(leaf)
                                                 for leaf in jax.tree.leaves(diagonal))),
        "initial_loss": float(objective.value(params, model.apply(params, x), targets)),
        **{f"last_loss_c{run['factor']:g}": run["last_loss"] for run in runs},
    }
    rows = [{"factor c": run["factor"], "eta": run["eta"], "loss at 0": run["losses"][0],
             "last loss": run["last_loss"], "lambda_max last seen": (
                 run["sharpness"][-1][1] if run["sharpness"] else None),
             "2 / eta": run["two_over_eta"], "diverged": run["diverged"]} for run in runs]
    results.write_results(run.workdir, EXPERIMENT, dataclasses.asdict(config), metrics, [],
                          seconds, power_iterations={k: v.tolist() for k, v in
                                                     estimates.items()}, runs=runs)
    plot(run.workdir / "largest_eigenvalue.png", estimates, runs)
    summary = results.markdown_table([{
        "estimate": name, "lambda_max": float(values[-1]),
        "iterations": len(values)} for name, values in estimates.items()] + [{
            "estimate": "max of LeCun's diagonal", "lambda_max": metrics[
                "max_backpropagated_diagonal"], "iterations": None}])
    results.save_and_print_table(run.workdir, summary + "\n" + (
        results.markdown_table(rows) if rows else "") + f"\nResults in {run.workdir}\n")
    return metrics


if __name__ == "__main__":
    run_main(main, EXPERIMENT)
