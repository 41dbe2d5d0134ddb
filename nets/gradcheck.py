"""Gradient checks: the hand-written backward against jax.grad and finite differences.

One tolerance table (`TOLERANCES`) serves the tests, the experiments and the report:

    float64: manual vs jax.grad relative error <= 1e-10; each vs central finite
             differences <= 1e-6 (the truncation error of a step h is O(h^2 f''') and the
             rounding error O(eps |E| / h); h = 1e-6 keeps both near 1e-10 on O(1) problems;
             where the gradient is far smaller than E the rounding error is larger, and
             `finite_difference_tolerance` raises the bound to ten times it, saying so in
             the report's "fd_tolerance");
    float32: manual vs jax.grad relative error <= 1e-5.

Relative error is a norm ratio over a whole parameter tensor,
    rel(a, b) = ||a - b|| / max(||a||, ||b||, tiny),
so that entries whose true gradient is nearly zero do not dominate. Cosine similarity is
<a, b> / (||a|| ||b||) (1 for two zero tensors).
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np

from nets import engines, losses
from nets.layers import Layer
from nets.losses import Objective

__all__ = [
    "TOLERANCES",
    "FINITE_DIFFERENCE_STEP",
    "relative_error",
    "cosine_similarity",
    "named_parameters",
    "astype",
    "finite_difference_grad",
    "gradient_report",
    "finite_difference_tolerance",
    "gauss_newton_diagonal",
    "hessian_diagonal",
]

TOLERANCES = {
    "float64": {"vs_autodiff": 1e-10, "vs_finite_diff": 1e-6},
    "float32": {"vs_autodiff": 1e-5},
}
FINITE_DIFFERENCE_STEP = 1e-6


def relative_error(a: Any, b: Any) -> float:
    """||a - b|| / max(||a||, ||b||, tiny), computed in float64 NumPy."""
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    scale = max(np.linalg.norm(a), np.linalg.norm(b), np.finfo(np.float64).tiny)
    return float(np.linalg.norm(a - b) / scale)


def cosine_similarity(a: Any, b: Any) -> float:
    """<a, b> / (||a|| ||b||); 1.0 when both are zero, 0.0 when exactly one is."""
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    norms = np.linalg.norm(a) * np.linalg.norm(b)
    if norms == 0:
        return float(np.array_equal(a, b))
    return float(a @ b / norms)


def astype(tree: Any, dtype: Any) -> Any:
    """Every floating-point leaf of `tree` cast to dtype."""
    return jax.tree.map(
        lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree
    )


def named_parameters(model: Layer, params: Any) -> Iterator[tuple[str, str, tuple]]:
    """(layer name, parameter name, pytree path) for every leaf of `params`.

    Combinators (layers with `sublayers`) are descended into, so each leaf is named after the
    plain layer that owns it.
    """
    yield from _named(model, params, ())


def _named(model, params, prefix):
    if model.sublayers:
        for index, (layer, layer_params) in enumerate(zip(model.sublayers, params)):
            yield from _named(layer, layer_params, prefix + (jax.tree_util.SequenceKey(index),))
        return
    for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]:
        param_name = jax.tree_util.keystr(path).strip("[]'\"") or "value"
        yield model.name, param_name, prefix + tuple(path)


def _get(tree, path):
    for key in path:
        tree = tree[getattr(key, "key", getattr(key, "idx", None))]
    return tree


def _set(tree, path, value):
    if not path:
        return value
    head, rest = path[0], path[1:]
    index = getattr(head, "key", getattr(head, "idx", None))
    if isinstance(tree, dict):
        return {**tree, index: _set(tree[index], rest, value)}
    items = list(tree)
    items[index] = _set(items[index], rest, value)
    return type(tree)(items)


def finite_difference_grad(
    energy, params: Any, path: tuple, coordinates: np.ndarray, step: float
) -> np.ndarray:
    """Central differences (E(p + h e_i) - E(p - h e_i)) / 2h for the chosen flat indices.

    `energy(params) -> scalar`; `path` picks one leaf of params; returns one value per
    coordinate. Evaluated in the dtype of params (use float64).
    """
    def shifted_energy(params, index, sign):
        leaf = _get(params, path)
        flat = leaf.ravel().at[index].add(sign * step)
        return energy(_set(params, path, flat.reshape(leaf.shape)))

    def differences(params, indices):
        # In chunks of coordinates (lax.map's batch_size): each perturbed copy of params lives
        # only while its chunk runs, so memory stays ~ chunk x params.
        chunk = int(max(1, min(len(coordinates), 2**24 // max(1, _size(params)))))
        return jax.lax.map(
            lambda i: (shifted_energy(params, i, 1.0) - shifted_energy(params, i, -1.0))
            / (2 * step), indices, batch_size=chunk)

    # params are an argument, not a constant of the jitted function, so XLA does not try to
    # constant-fold the whole forward pass.
    return np.asarray(jax.jit(differences)(params, jnp.asarray(coordinates)))


def finite_difference_tolerance(energy: float, step: float, gradient: np.ndarray) -> float:
    """The finite-difference tolerance for one tensor: the table's 1e-6, or, when larger, ten
    times the rounding error a central difference must have relative to this gradient.

    Each of E(p +- h e_i) is rounded to about eps |E|, so the difference quotient carries an
    error of about eps |E| / h per coordinate, whatever the backward pass does; relative to
    the gradient's root-mean-square g that is eps |E| / (h g). It is below 1e-8 for every
    model here except the first layers of deep nets (AlexNet's conv1: ~3e-5).
    """
    rms = float(np.sqrt(np.mean(np.square(np.asarray(gradient, np.float64)))))
    rounding = np.finfo(np.float64).eps * abs(energy) / (step * max(rms, np.finfo(float).tiny))
    return max(TOLERANCES["float64"]["vs_finite_diff"], 10 * rounding)


def _size(tree: Any) -> int:
    return sum(leaf.size for leaf in jax.tree.leaves(tree))


def gradient_report(
    model: Layer,
    objective: Objective,
    params: Any,
    x: jax.Array,
    targets: jax.Array,
    dtype: Any = jnp.float64,
    model_name: str | None = None,
    max_fd_coordinates: int = 256,
    seed: int = 0,
    fd_step: float = FINITE_DIFFERENCE_STEP,
) -> list[dict]:
    """Manual vs jax.grad (and, in float64, both vs finite differences), per layer and param.

    Params, x and targets are cast to dtype first; products run at matmul precision "highest".
    Finite differences are taken in float64 on up to `max_fd_coordinates` coordinates of each
    tensor (all of them when the tensor is that small; otherwise a seeded random sample), with
    step `fd_step`: the rounding error of a central difference is about eps |E| / h, so a net
    whose gradients are far smaller than E (deep nets' first layers) needs a larger h. Returns
    one dict per parameter tensor with keys model, layer, param, dtype, max_abs_err,
    rel_err_vs_autodiff, cosine, rel_err_vs_finite_diff (manual),
    autodiff_rel_err_vs_finite_diff, fd_coordinates, passed.
    """
    dtype_name = jnp.dtype(dtype).name
    if dtype_name not in TOLERANCES:
        raise ValueError(f"gradient_report: dtype {dtype_name}; choose one of {list(TOLERANCES)}")
    # float64 needs jax_enable_x64; enable it for this report only, whatever the process set.
    precision = jax.enable_x64(True) if dtype_name == "float64" else contextlib.nullcontext()
    # Full-precision float32 products on every backend (a GPU's default may use TF32, whose
    # 10-bit mantissa would make the two engines differ by ~1e-3 for rounding alone).
    with precision, jax.default_matmul_precision("highest"):
        return _gradient_report(
            model, objective, params, x, targets, dtype, dtype_name, model_name,
            max_fd_coordinates, seed, fd_step,
        )


def _gradient_report(
    model, objective, params, x, targets, dtype, dtype_name, model_name, max_fd_coordinates, seed,
    fd_step,
):
    params, x, targets = astype(params, dtype), astype(x, dtype), astype(targets, dtype)
    _, manual_grad = jax.jit(engines.manual(model, objective))(params, x, targets)
    _, autodiff_grad = jax.jit(engines.autodiff(model, objective))(params, x, targets)

    with_fd = dtype_name == "float64"
    if with_fd:
        params64, x64, targets64 = (astype(t, jnp.float64) for t in (params, x, targets))

        def energy(p):
            return objective.value(p, model.apply(p, x64), targets64)

        energy_value = energy(params64)

    tolerance = TOLERANCES[dtype_name]
    rng = np.random.default_rng(seed)
    rows = []
    for layer_name, param_name, path in named_parameters(model, params):
        manual_leaf = np.asarray(_get(manual_grad, path))
        autodiff_leaf = np.asarray(_get(autodiff_grad, path))
        row = {
            "model": model_name or model.name,
            "layer": layer_name,
            "param": param_name,
            "dtype": dtype_name,
            "shape": list(manual_leaf.shape),
            "max_abs_err": float(np.max(np.abs(manual_leaf - autodiff_leaf), initial=0.0)),
            "rel_err_vs_autodiff": relative_error(manual_leaf, autodiff_leaf),
            "cosine": cosine_similarity(manual_leaf, autodiff_leaf),
            "rel_err_vs_finite_diff": None,
            "autodiff_rel_err_vs_finite_diff": None,
            "fd_coordinates": 0,
        }
        passed = row["rel_err_vs_autodiff"] <= tolerance["vs_autodiff"]
        if with_fd:
            size = manual_leaf.size
            coordinates = (
                np.arange(size)
                if size <= max_fd_coordinates
                else np.sort(rng.choice(size, max_fd_coordinates, replace=False))
            )
            fd = finite_difference_grad(energy, params64, path, coordinates, fd_step)
            row["rel_err_vs_finite_diff"] = relative_error(manual_leaf.ravel()[coordinates], fd)
            row["autodiff_rel_err_vs_finite_diff"] = relative_error(
                autodiff_leaf.ravel()[coordinates], fd
            )
            row["fd_coordinates"] = int(coordinates.size)
            row["fd_tolerance"] = finite_difference_tolerance(
                float(energy_value), fd_step, autodiff_leaf.ravel()[coordinates])
            passed = passed and max(
                row["rel_err_vs_finite_diff"], row["autodiff_rel_err_vs_finite_diff"]
            ) <= row["fd_tolerance"]
        row["passed"] = bool(passed)
        rows.append(row)
    return rows


def _flat_function(function, params):
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    return flat, unravel, lambda vector: function(unravel(vector))


def gauss_newton_diagonal(model: Layer, objective: Objective, params: Any, x: jax.Array,
                          targets: jax.Array) -> Any:
    """The exact diagonal of the Gauss-Newton matrix J^T H J + (lambda/m) I_weights, by jax.

    J = d outputs / d params (jax.jacrev), H = the loss's curvature at the outputs (a diagonal
    for the elementwise losses). The independent reference for `engines.curvature_diagonal`.
    """
    flat, unravel, outputs_of = _flat_function(lambda p: model.apply(p, x), params)
    jacobian = jax.jacrev(outputs_of)(flat)  # (batch, classes, parameters)
    outputs = model.apply(params, x)
    weights = objective.loss.curvature(outputs, targets)
    diagonal = jnp.einsum("bc,bcp->p", weights, jacobian**2)
    ones = jax.tree.map(jnp.ones_like, params)
    penalty, _ = jax.flatten_util.ravel_pytree(
        losses.l2_penalty_grad(ones, objective.l2, outputs.shape[0]))
    return unravel(diagonal + penalty)


def hessian_diagonal(model: Layer, objective: Objective, params: Any, x: jax.Array,
                     targets: jax.Array) -> Any:
    """jnp.diag(jax.hessian(E)) over all parameters: the true second derivatives."""
    flat, unravel, energy = _flat_function(
        lambda p: objective.value(p, model.apply(p, x), targets), params)
    return unravel(jnp.diag(jax.hessian(energy)(flat)))
