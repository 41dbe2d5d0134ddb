"""Gradient checks: the hand-written backward against jax.grad and finite differences.

One tolerance table (`TOLERANCES`) serves the tests, the experiments and the report:

    float64: manual vs jax.grad relative error <= 1e-10; each vs central finite
             differences <= 1e-6 (the truncation error of a step h is O(h^2 f''') and the
             rounding error O(eps |E| / h); h = 1e-6 keeps both near 1e-10 on O(1) problems;
             where the gradient is far smaller than E the rounding error is larger, and
             `finite_difference_tolerance` raises the bound to ten times it, saying so in
             the report's "fd_tolerance");
             Coordinates with a kink within h of the parameters (a ReLU crossing zero, a
             max changing its winner) are left out of that comparison and counted
             ("fd_kinks") where jax.grad's difference from the central difference is the
             kink's effect, (E(p+h) - 2E(p) + E(p-h)) / 2h (`kink_gaps`,
             `smooth_coordinates`);
    float32: manual vs jax.grad relative error <= 1e-5.

Both reports also read the hand-written pass's program (`jax_differentiated`): an equation
that JAX's differentiation wrote there (a backward by `jax.vjp`, a tangent by `jax.jvp`)
fails every row ("by_hand" false), as no comparison of values can see it. So does a float32
check whose pass computes in float64 anywhere ("wider_floats", `wider_floats`): under x64 an
array made without a dtype is float64 and promotes what meets it, and the float32 check
would then measure float64 arithmetic.

Relative error is a norm ratio over a whole parameter tensor,
    rel(a, b) = ||a - b|| / max(||a||, ||b||, tiny),
so that entries whose true gradient is nearly zero do not dominate. Cosine similarity is
<a, b> / (||a|| ||b||) (1 for two zero tensors).
"""
from __future__ import annotations

import contextlib
import functools
from typing import Any, Iterator

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np

from nets import engines, losses
from nets.layers import Layer, forward_with_key, is_count, is_finite_number, plain_layers, serial
from nets.losses import Objective

__all__ = [
    "TOLERANCES",
    "FINITE_DIFFERENCE_STEP",
    "relative_error",
    "cosine_similarity",
    "named_parameters",
    "parameter",
    "astype",
    "moved_parameters",
    "finite_difference_grad",
    "finite_difference_grads",
    "shifted_energies",
    "kink_gaps",
    "smooth_coordinates",
    "jax_differentiated",
    "gradient_report",
    "layer_report",
    "finite_difference_tolerance",
    "gauss_newton_diagonal",
    "gauss_newton_product_reference",
    "hessian_product_reference",
    "hidden_state_product_reference",
    "hessian_diagonal",
]

TOLERANCES = {
    "float64": {"vs_autodiff": 1e-10, "vs_finite_diff": 1e-6},
    "float32": {"vs_autodiff": 1e-5},
}
FINITE_DIFFERENCE_STEP = 1e-6


def _flat_pair(function: str, a: Any, b: Any) -> tuple[np.ndarray, np.ndarray]:
    """a and b raveled in float64; a ValueError where their sizes differ (one of size 1, or
    a (1, n) against an (n, n), would have been broadcast against the other)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.size != b.size:
        raise ValueError(f"{function}: a has shape {a.shape} and b {b.shape}; expected as "
                         "many entries in each")
    return a.ravel(), b.ravel()


def relative_error(a: Any, b: Any) -> float:
    """||a - b|| / max(||a||, ||b||, tiny), computed in float64 NumPy (a ValueError for a and b
    of different sizes)."""
    a, b = _flat_pair("relative_error", a, b)
    scale = max(np.linalg.norm(a), np.linalg.norm(b), np.finfo(np.float64).tiny)
    return float(np.linalg.norm(a - b) / scale)


def cosine_similarity(a: Any, b: Any) -> float:
    """<a, b> / (||a|| ||b||); 1.0 when both are zero, 0.0 when exactly one is (a ValueError
    for a and b of different sizes)."""
    a, b = _flat_pair("cosine_similarity", a, b)
    norms = np.linalg.norm(a) * np.linalg.norm(b)
    if norms == 0:
        return float(np.array_equal(a, b))
    return float(a @ b / norms)


def astype(tree: Any, dtype: Any) -> Any:
    """Every floating-point leaf of `tree` cast to dtype."""
    return jax.tree.map(
        lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree
    )


ZERO_LEAF_SPREAD = 0.2


def moved_parameters(key: jax.Array, params: Any, scale: float = 0.5) -> Any:
    """A generic point near the initial one: every floating-point leaf p moved to
    p + scale * rms(p) * N(0, 1), entry by entry, where rms(p) = sqrt(mean(p^2)); an all-zero
    leaf (a bias) as if its rms were `ZERO_LEAF_SPREAD`. Activations keep the scale the init
    chose, but no gain stays at exactly 1 and no bias at 0, where a backward that divides by
    a gain, or drops one, still agrees with jax.grad. scale 0 returns params unchanged.

    A ValueError for a scale that is not a finite number >= 0.
    """
    if not is_finite_number(scale) or scale < 0:
        raise ValueError(f"moved_parameters: scale must be a finite number >= 0, got {scale!r}")
    leaves, structure = jax.tree.flatten(params)
    keys = jax.random.split(key, max(len(leaves), 1))

    def moved(leaf, leaf_key):
        if not jnp.issubdtype(leaf.dtype, jnp.floating) or scale == 0:
            return leaf
        rms = jnp.sqrt(jnp.mean(jnp.square(leaf)))
        spread = jnp.where(rms > 0, rms, ZERO_LEAF_SPREAD).astype(leaf.dtype)
        return leaf + scale * spread * jax.random.normal(leaf_key, jnp.shape(leaf), leaf.dtype)

    return jax.tree.unflatten(structure, [moved(leaf, k) for leaf, k in zip(leaves, keys)])


def named_parameters(model: Layer, params: Any) -> Iterator[tuple[str, str, tuple]]:
    """(layer name, parameter name, pytree path) for every leaf of `params`.

    Combinators (layers with `sublayers`) are descended into, so each leaf is named after the
    plain layer that owns it; a leaf nested inside a layer's params is named by its keys
    joined with dots ("qkv.w").
    """
    yield from _named(model, params, ())


def parameter(model: Layer, params: Any, layer: str, name: str) -> Any:
    """The leaf of `params` that `named_parameters` calls (layer, name), e.g. LeNet-1989's
    ("H1", "w"); a name it does not give is refused with the names it does, and so is a name
    that several layers share (two default-named Dense layers)."""
    named = {}
    for layer_name, param_name, path in named_parameters(model, params):
        named.setdefault((layer_name, param_name), []).append(path)
    if len(named.get((layer, name), ())) > 1:
        raise KeyError(f"{model.name}: {len(named[(layer, name)])} layers are named {layer!r}; "
                       "name them apart to pick one")
    if (layer, name) not in named:
        raise KeyError(f"{model.name}: no parameter {layer}.{name}; it has "
                       f"{', '.join(f'{a}.{b}' for a, b in named)}")
    return _get(params, named[(layer, name)][0])


def _named(model, params, prefix):
    for layer, layer_params, layer_path in plain_layers(model, params, prefix):
        for path, _ in jax.tree_util.tree_flatten_with_path(layer_params)[0]:
            param_name = ".".join(str(getattr(key, "key", getattr(key, "idx", key)))
                                  for key in path) or "value"
            yield layer.name, param_name, layer_path + tuple(path)


def _get(tree, path):
    for key in path:
        tree = tree[getattr(key, "key", getattr(key, "idx", None))]
    return tree


def finite_difference_grad(
    energy, params: Any, path: tuple, coordinates: np.ndarray, step: float
) -> np.ndarray:
    """Central differences (E(p + h e_i) - E(p - h e_i)) / 2h for the chosen flat indices.

    `energy(params) -> scalar`; `path` picks one leaf of params; returns one value per
    coordinate. Evaluated in the dtype of params (use float64).
    """
    return finite_difference_grads(energy, params, {path: coordinates}, step)[_raw(path)]


def finite_difference_grads(
    energy, params: Any, coordinates: dict[tuple, np.ndarray], step: float
) -> dict[tuple, np.ndarray]:
    """`finite_difference_grad` for several leaves at once, as one compiled function.

    `coordinates` maps a pytree path to the flat indices of that leaf to perturb; returns
    {raw path: differences}, the raw path being the path's plain keys and indices.
    """
    return {path: (plus - minus) / (2 * step)
            for path, (plus, minus) in shifted_energies(energy, params, coordinates, step).items()}


def shifted_energies(
    energy, params: Any, coordinates: dict[tuple, np.ndarray], step: float
) -> dict[tuple, tuple[np.ndarray, np.ndarray]]:
    """{raw path: (E(p + h e_i), E(p - h e_i)) for the chosen flat indices i of that leaf}.

    Each E(p +- h e_i) perturbs one entry of the raveled parameter vector; one compilation
    serves every leaf (compiled per leaf, as before 2026-12-02, the 8 smaller models' reports
    took 84 s on the 2-core CPU, now 63 s). The values agree with per-leaf ones to their own
    rounding error, eps |E|: XLA may sum E in another order in the other program.
    """
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    offsets, sizes, offset = {}, {}, 0
    for leaf_path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        offsets[_raw(leaf_path)] = offset
        sizes[_raw(leaf_path)] = int(np.size(leaf))
        offset += int(np.size(leaf))
    wanted = {_raw(path): _leaf_indices(path, indices, sizes) for path, indices
              in coordinates.items()}
    if not wanted:
        return {}
    indices = np.concatenate([offsets[path] + local for path, local in wanted.items()])

    def shifted_energy(flat, index, sign):
        return energy(unravel(flat.at[index].add(sign * step)))

    def both_sides(flat, indices):
        # In chunks of coordinates (lax.map's batch_size): each perturbed copy of params lives
        # only while its chunk runs, so memory stays ~ chunk x params.
        chunk = int(max(1, min(len(indices), 2**24 // max(1, flat.size))))
        return jax.lax.map(
            lambda i: jnp.stack([shifted_energy(flat, i, 1.0), shifted_energy(flat, i, -1.0)]),
            indices, batch_size=chunk)

    # params are an argument, not a constant of the jitted function, so XLA does not try to
    # constant-fold the whole forward pass.
    values = np.asarray(jax.jit(both_sides)(flat, jnp.asarray(indices)))
    split = np.cumsum([local.size for local in wanted.values()])[:-1]
    return {path: (pair[:, 0], pair[:, 1]) for path, pair in zip(wanted, np.split(values, split))}


def _leaf_indices(path: tuple, indices: Any, sizes: dict[tuple, int]) -> np.ndarray:
    """The flat indices of the leaf at path, checked: a path params do not have, and an index
    that is not a whole number in [0, leaf size), are ValueErrors (an index past the leaf, or
    a negative one, perturbed a neighbouring leaf, and 1.7 was read as 1)."""
    raw = _raw(path)
    if raw not in sizes:
        raise ValueError(f"finite differences: params have no leaf at {raw}; they have "
                         f"{list(sizes)}")
    indices = np.asarray(indices)
    if indices.ndim != 1 or not (indices.size == 0 or np.issubdtype(indices.dtype, np.integer)):
        raise ValueError(f"finite differences: the indices of leaf {raw} must be a 1-d array "
                         f"of integers, got {indices.dtype} {indices.shape}")
    if indices.size and not (indices.min() >= 0 and indices.max() < sizes[raw]):
        raise ValueError(f"finite differences: the indices of leaf {raw} must lie in [0, "
                         f"{sizes[raw]}), got {indices.min()} to {indices.max()}")
    return indices.astype(np.int64)


def kink_gaps(plus: np.ndarray, minus: np.ndarray, energy: float, step: float) -> np.ndarray:
    """(E(p + h) - 2 E(p) + E(p - h)) / 2h per coordinate: half the forward difference minus
    the backward one.

    Where E is smooth within h this is h E''/2 (plus rounding, about eps |E| / h). Where a kink
    (a ReLU crossing zero, a max changing its winner) lies within h of p, it is what the kink
    adds to the central difference's error: with the kink at distance d on the + side and
    a jump D of dE/dp_i there, the forward difference is off by D (h - d) / h and the backward
    one not at all, so the central difference is off by D (h - d) / 2h, which is the gap.
    """
    return (plus - 2 * energy + minus) / (2 * step)


def _raw(path: tuple) -> tuple:
    """A pytree path as its plain dict keys and sequence indices (comparable across key types)."""
    return tuple(getattr(key, "key", getattr(key, "idx", None)) for key in path)


def finite_difference_tolerance(energy: float, step: float, gradient: np.ndarray,
                                *others: np.ndarray) -> float:
    """The finite-difference tolerance for one tensor: the table's 1e-6, or, when larger, ten
    times the rounding error a central difference must have relative to this gradient.

    Each of E(p +- h e_i) is rounded to about eps |E|, so the difference quotient carries an
    error of about eps |E| / h per coordinate, whatever the backward pass does; relative to
    the gradient's root-mean-square g that is eps |E| / (h g). It is below 1e-8 for every
    model here except the first layers of deep nets (AlexNet's conv1: ~3e-5). g is the
    largest root-mean-square of `gradient` and `others` (the report passes jax.grad's and the
    finite differences): a jax.grad of 0 where the differences are not (a forward pass both
    engines get wrong, e.g. a stop_gradient) must not make the bound infinite.
    """
    rms = max(float(np.sqrt(np.mean(np.square(np.asarray(values, np.float64)))))
              for values in (gradient, *others))
    rounding = np.finfo(np.float64).eps * abs(energy) / (step * max(rms, np.finfo(float).tiny))
    return max(TOLERANCES["float64"]["vs_finite_diff"], 10 * rounding)


def smooth_coordinates(fd: np.ndarray, gaps: np.ndarray, reference: np.ndarray,
                       tolerance: float) -> np.ndarray:
    """Which coordinates the central differences `fd` can check: all but those where a kink
    within h explains the difference from the reference gradient (jax.grad's).

    A coordinate is left out when |fd - reference| exceeds tolerance x the root-mean-square of
    the reference (it would count against the tolerance) and equals the kink's measured
    effect |gap| (`kink_gaps`) to within 1%: a smooth E gives gaps of h E''/2, far from an
    error the size of the tolerance, so a real disagreement with jax.grad is not mistaken for
    a kink. The test never looks at the hand-written gradient, which is compared with the
    central differences on the coordinates kept (and with jax.grad on all of them); the
    report counts those left out ("fd_kinks") and fails a tensor with more than half left out.
    """
    reference = np.asarray(reference, np.float64)
    rms = float(np.sqrt(np.mean(np.square(reference))))
    error, gaps = np.abs(fd - reference), np.abs(gaps)
    kinked = (error > tolerance * rms) & (np.abs(error - gaps) <= 0.01 * gaps)
    return ~kinked


def _size(tree: Any) -> int:
    return sum(leaf.size for leaf in jax.tree.leaves(tree))


AUTODIFF_MARKS = ("jvp(", "transpose(")


def _equations(jaxpr: Any) -> Iterator[Any]:
    """Every equation of a jaxpr, those of the jaxprs inside its equations' params too (scan,
    cond, jit, remat)."""
    for equation in jaxpr.eqns:
        yield equation
        for value in equation.params.values():
            for inner in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(inner, "jaxpr", inner)  # a ClosedJaxpr's, or a Jaxpr itself
                if hasattr(inner, "eqns"):
                    yield from _equations(inner)


def _name_stacks(jaxpr: Any) -> set[str]:
    return {str(equation.source_info.name_stack) for equation in _equations(jaxpr)}


def jax_differentiated(function: Any, *args: Any) -> list[str]:
    """The name stacks, sorted, of the equations in `function(*args)`'s program that JAX's
    differentiation wrote: [] for a pass written by hand.

    Every equation that `jax.jvp`, `jax.linearize` or `jax.jacfwd` adds names `jvp(...)` in
    its source's name stack, and every one that `jax.grad`, `jax.vjp` or `jax.jacrev` adds
    `transpose(jvp(...))`, inside jit, scan, cond and remat too. The program is traced
    (`jax.make_jaxpr`), not compiled. A backward that returns `jax.vjp` of its forward gives
    the same numbers as `jax.grad`; only its program tells it apart. The marks are JAX's
    naming, not an API: tests/test_gradcheck.py checks that `jax.grad`'s and `jax.jvp`'s
    programs are seen, so a JAX that named them otherwise fails there instead of every pass
    passing here.
    """
    return _differentiated(jax.make_jaxpr(function)(*args).jaxpr)


def _differentiated(jaxpr: Any) -> list[str]:
    stacks = _name_stacks(jaxpr)
    return sorted(s for s in stacks if any(mark in s for mark in AUTODIFF_MARKS))


def wider_floats(function: Any, dtype: Any, *args: Any) -> list[str]:
    """The equations of `function(*args)`'s program, as sorted "primitive -> dtype" strings,
    that output floating-point values wider than dtype: [] when a float32 pass stays in
    float32. Under x64 an array made without a dtype (`jnp.ones(n)`) is float64, and JAX's
    standard promotion turns what it meets into float64 without a word. A weakly typed value
    (from Python numbers alone: `jnp.where(c, 1.0, 0.5)`) takes the dtype of the array it
    meets, so it is not counted. Traced, not compiled."""
    return _wider_floats(jax.make_jaxpr(function)(*args).jaxpr, dtype)


def _wider_floats(jaxpr: Any, dtype: Any) -> list[str]:
    bits = jnp.finfo(dtype).bits
    found = set()
    for equation in _equations(jaxpr):
        for variable in equation.outvars:
            value_dtype = getattr(variable.aval, "dtype", None)
            if (value_dtype is not None and not getattr(variable.aval, "weak_type", False)
                    and jnp.issubdtype(value_dtype, jnp.floating)
                    and jnp.finfo(value_dtype).bits > bits):
                found.add(f"{equation.primitive.name} -> {jnp.dtype(value_dtype).name}")
    return sorted(found)


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
    key: jax.Array | None = None,
) -> list[dict]:
    """Manual vs jax.grad (and, in float64, both vs finite differences), per layer and param.

    Params, x and targets are cast to dtype first; products run at matmul precision "highest".
    Finite differences are taken in float64 on up to `max_fd_coordinates` coordinates of each
    tensor (all of them when the tensor is that small; otherwise a seeded random sample), with
    step `fd_step`: the rounding error of a central difference is about eps |E| / h, so a net
    whose gradients are far smaller than E (deep nets' first layers) needs a larger h. Returns
    one dict per parameter tensor with keys model, layer, param, dtype, max_abs_err,
    rel_err_vs_autodiff, cosine, rel_err_vs_finite_diff (manual),
    autodiff_rel_err_vs_finite_diff, fd_coordinates (those compared), fd_kinks (those left
    out: a kink within h, see `smooth_coordinates`; at most half may be), mismatch (None, or
    the shape or dtype in which the manual gradient differs from jax.grad's: a failure),
    by_hand (the manual engine's program holds no equation of JAX's differentiation,
    `jax_differentiated`; false fails every row), wider_floats (the equations of that program
    that compute in a wider float than dtype, `wider_floats`; any fails every row), passed.
    `key` goes
    to a stochastic model (dropout): all three gradients then hold the same draws fixed.
    """
    dtype_name = jnp.dtype(dtype).name
    if dtype_name not in TOLERANCES:
        raise ValueError(f"gradient_report: dtype {dtype_name}; choose one of {list(TOLERANCES)}")
    # 0 coordinates passed every tensor on a finite-difference error of 0.0 measured on none
    if not (is_count(max_fd_coordinates) and max_fd_coordinates >= 1):
        raise ValueError(f"gradient_report: max_fd_coordinates must be a whole number >= 1, got "
                         f"{max_fd_coordinates!r}")
    if not (is_finite_number(fd_step) and fd_step > 0):  # 0 or NaN made every difference NaN
        raise ValueError(f"gradient_report: fd_step must be a finite number > 0, got "
                         f"{fd_step!r}")
    # float64 needs jax_enable_x64; enable it for this report only, whatever the process set.
    precision = jax.enable_x64(True) if dtype_name == "float64" else contextlib.nullcontext()
    # Full-precision float32 products on every backend (a GPU's default may use TF32, whose
    # 10-bit mantissa would make the two engines differ by ~1e-3 for rounding alone).
    with precision, jax.default_matmul_precision("highest"):
        return _gradient_report(
            model, objective, params, x, targets, dtype, dtype_name, model_name,
            max_fd_coordinates, seed, fd_step, key,
        )


def _gradient_report(
    model, objective, params, x, targets, dtype, dtype_name, model_name, max_fd_coordinates, seed,
    fd_step, key,
):
    params, x, targets = astype(params, dtype), astype(x, dtype), astype(targets, dtype)
    traced = jax.jit(engines.manual(model, objective)).trace(params, x, targets, key)
    by_hand = not _differentiated(traced.jaxpr.jaxpr)  # the program compiled next
    wider = _wider_floats(traced.jaxpr.jaxpr, dtype)
    _, manual_grad = traced.lower().compile()(params, x, targets, key)
    _, autodiff_grad = jax.jit(engines.autodiff(model, objective))(params, x, targets, key)

    with_fd = dtype_name == "float64"
    if with_fd:
        params64, x64, targets64 = (astype(t, jnp.float64) for t in (params, x, targets))

        def energy(p):
            return objective.value(p, model.apply(p, x64, key), targets64)

        energy_value = jax.jit(energy)(params64)

    tolerance = TOLERANCES[dtype_name]
    rng = np.random.default_rng(seed)
    leaves = list(named_parameters(model, params))
    coordinates = {}
    if with_fd:
        for _, _, path in leaves:
            size = int(np.size(_get(params, path)))
            coordinates[path] = (
                np.arange(size)
                if size <= max_fd_coordinates
                else np.sort(rng.choice(size, max_fd_coordinates, replace=False))
            )
        shifted = shifted_energies(energy, params64, coordinates, fd_step)
    rows = []
    for layer_name, param_name, path in leaves:
        manual_leaf = np.asarray(_get(manual_grad, path))
        autodiff_leaf = np.asarray(_get(autodiff_grad, path))
        # compared flattened; a gradient of another size has no error to measure (its
        # difference would have been broadcast), and fails by its mismatch below
        same_size = manual_leaf.size == autodiff_leaf.size
        row = {
            "model": model_name or model.name,
            "layer": layer_name,
            "param": param_name,
            "dtype": dtype_name,
            "shape": list(manual_leaf.shape),
            "max_abs_err": float(np.max(np.abs(manual_leaf.ravel() - autodiff_leaf.ravel()),
                                        initial=0.0)) if same_size else float("inf"),
            "rel_err_vs_autodiff": (relative_error(manual_leaf, autodiff_leaf) if same_size
                                    else float("inf")),
            "cosine": cosine_similarity(manual_leaf, autodiff_leaf) if same_size else 0.0,
            "rel_err_vs_finite_diff": None,
            "autodiff_rel_err_vs_finite_diff": None,
            "fd_coordinates": 0,
            "fd_kinks": 0,
        }
        # a gradient of another shape or dtype is wrong, whatever its values (relative_error
        # compares them flattened)
        row["mismatch"] = next((f"{what} {ours} against jax.grad's {theirs}" for what, ours, theirs
                                in (("shape", manual_leaf.shape, autodiff_leaf.shape),
                                    ("dtype", manual_leaf.dtype, autodiff_leaf.dtype))
                                if ours != theirs), None)
        row["by_hand"] = by_hand
        row["wider_floats"] = wider
        passed = (by_hand and not wider and row["mismatch"] is None
                  and row["rel_err_vs_autodiff"] <= tolerance["vs_autodiff"])
        if with_fd:
            chosen, (plus, minus) = coordinates[path], shifted[_raw(path)]
            fd = (plus - minus) / (2 * fd_step)
            autodiff_chosen = autodiff_leaf.ravel()[chosen]
            row["fd_tolerance"] = finite_difference_tolerance(
                float(energy_value), fd_step, autodiff_chosen, fd)
            smooth = smooth_coordinates(fd, kink_gaps(plus, minus, float(energy_value), fd_step),
                                        autodiff_chosen, row["fd_tolerance"])
            row["fd_coordinates"] = int(smooth.sum())
            row["fd_kinks"] = int(chosen.size - smooth.sum())
            row["rel_err_vs_finite_diff"] = relative_error(
                manual_leaf.ravel()[chosen][smooth], fd[smooth]) if same_size else float("inf")
            row["autodiff_rel_err_vs_finite_diff"] = relative_error(
                autodiff_chosen[smooth], fd[smooth])
            passed = passed and 2 * row["fd_coordinates"] >= chosen.size and max(
                row["rel_err_vs_finite_diff"], row["autodiff_rel_err_vs_finite_diff"]
            ) <= row["fd_tolerance"]
        row["passed"] = bool(passed)
        rows.append(row)
    return rows


def layer_report(
    layer: Layer,
    params: Any,
    x: jax.Array,
    dtype: Any = jnp.float64,
    seed: int = 0,
    key: jax.Array | None = None,
) -> list[dict]:
    """One layer checked on its own: its hand-written backward against `jax.vjp` of its
    `apply`, for a random output gradient dy (standard normal, from `seed`), at params and x
    cast to dtype. A model (`serial`, ...) is checked as one layer, its own backward against
    the vjp of its whole apply.

    Returns one dict for dx (when x is floating; token ids have none) and one per parameter
    leaf, with keys layer, param ("dx", or the leaf's name as `named_parameters` gives it),
    dtype, shape, rel_err_vs_vjp, cosine, mismatch (None, or the shape or dtype in which the
    hand-written gradient differs: a failure), by_hand (the backward's program holds no
    equation of JAX's differentiation, `jax_differentiated`), wider_floats (the equations of
    the forward and backward passes that compute in a wider float than dtype,
    `wider_floats`) and passed (by_hand, no wider_floats, and
    rel_err_vs_vjp <= TOLERANCES[dtype]["vs_autodiff"]). Where `gradient_report` checks a
    layer inside a net, an error in a layer's dx shows in the rows of the layers below it;
    here it is its own "dx" row. `key` goes to a stochastic layer (both passes see the same
    draws). Products run at matmul precision "highest".
    """
    dtype_name = jnp.dtype(dtype).name
    if dtype_name not in TOLERANCES:
        raise ValueError(f"layer_report: dtype {dtype_name}; choose one of {list(TOLERANCES)}")
    precision = jax.enable_x64(True) if dtype_name == "float64" else contextlib.nullcontext()
    with precision, jax.default_matmul_precision("highest"):
        params, x = astype(params, dtype), astype(x, dtype)
        y, residuals = forward_with_key(layer, params, x, key)
        dy = jax.random.normal(jax.random.key(seed), y.shape, y.dtype)
        manual = layer.backward(params, residuals, dy)
        by_hand = not jax_differentiated(lambda: layer.backward(params, residuals, dy))
        wider = wider_floats(lambda: layer.backward(params, *forward_with_key(
            layer, params, x, key)[1:], dy), dtype)
        floating_x = jnp.issubdtype(x.dtype, jnp.floating)
        if floating_x:
            _, pullback = jax.vjp(lambda p, inputs: layer.apply(p, inputs, key), params, x)
            reference = pullback(dy)
        else:
            _, pullback = jax.vjp(lambda p: layer.apply(p, x, key), params)
            reference = (pullback(dy)[0], None)
    checked = [(layer_name, param_name, _get(manual[0], path), _get(reference[0], path))
               for layer_name, param_name, path in named_parameters(layer, params)]
    if floating_x:
        checked.insert(0, (layer.name, "dx", manual[1], reference[1]))
    rows = []
    for layer_name, name, ours, theirs in checked:
        ours, theirs = np.asarray(ours), np.asarray(theirs)
        mismatch = next((f"{what} {a} against jax.vjp's {b}" for what, a, b in
                         (("shape", ours.shape, theirs.shape), ("dtype", ours.dtype, theirs.dtype))
                         if a != b), None)
        error = relative_error(ours, theirs) if mismatch is None else float("inf")
        rows.append({"layer": layer_name, "param": name, "dtype": dtype_name,
                     "shape": list(ours.shape), "rel_err_vs_vjp": error,
                     "cosine": cosine_similarity(ours, theirs) if mismatch is None else 0.0,
                     "mismatch": mismatch, "by_hand": by_hand, "wider_floats": wider,
                     "passed": bool(by_hand and not wider and mismatch is None
                                    and error <= TOLERANCES[dtype_name]["vs_autodiff"])})
    return rows


def _flat_function(function, params):
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    return flat, unravel, lambda vector: function(unravel(vector))


def gauss_newton_diagonal(model: Layer, objective: Objective, params: Any, x: jax.Array,
                          targets: jax.Array) -> Any:
    """The exact diagonal of the Gauss-Newton matrix J^T H J + (lambda/m) I_weights, by jax.

    J = d outputs / d params (jax.jacrev), H = the whole Hessian of the loss with respect to
    the outputs, by jax (forward-over-reverse products H J, one per parameter): diagonal for
    the elementwise losses (mean squared error, sigmoid cross-entropy), with the couplings
    between one example's outputs for softmax cross-entropy and the MAP criterion, whose
    `curvature` keeps only H's diagonal. The independent reference for
    `engines.curvature_diagonal`, whose rule is exact where it is (LeCun et al. 1989: one
    path per output and a diagonal H). Compiled as one program (run op by op, its many
    small operations each compiled alone took most of a test's time).
    """
    diagonal = jax.jit(functools.partial(_gauss_newton_diagonal, model, objective))(
        params, x, targets)
    return jax.tree.map(lambda d, p: d.astype(jnp.result_type(p)), diagonal, params)


def _gauss_newton_diagonal(model: Layer, objective: Objective, params: Any, x: jax.Array,
                           targets: jax.Array) -> Any:
    flat, unravel, outputs_of = _flat_function(lambda p: model.apply(p, x), params)
    outputs = model.apply(params, x)
    # (outputs, parameters), in the outputs' dtype: float32 params met by float64 data gave
    # float32 columns, which jax.jvp refused as tangents of the float64 outputs
    jacobian = jax.jacrev(outputs_of)(flat).reshape(outputs.size, -1).astype(outputs.dtype)

    def loss_gradient(flat_outputs):
        return jax.grad(lambda o: objective.loss.value(o.reshape(outputs.shape), targets))(
            flat_outputs)

    def hessian_times(column):
        return jax.jvp(loss_gradient, (outputs.reshape(-1),), (column,))[1]

    diagonal = jnp.sum(jacobian * jax.vmap(hessian_times, in_axes=1, out_axes=1)(jacobian),
                       axis=0)
    ones = jax.tree.map(jnp.ones_like, params)
    penalty, _ = jax.flatten_util.ravel_pytree(
        losses.l2_penalty_grad(ones, objective.l2, outputs.shape[0]))
    return unravel(diagonal + penalty)


def gauss_newton_product_reference(model: Layer, objective: Objective):
    """G v by jax alone, the reference for `engines.gauss_newton_product`: J v by `jax.jvp`
    of the forward pass, H (J v) by `jax.jvp` of the loss's `jax.grad` in the outputs, J^T by
    `jax.vjp`, plus the L2 penalty's Hessian times v by `jax.jvp` of its `jax.grad`.
    Returns `product(params, x, targets, v, key=None)` (key: the model's dropout masks).
    """

    def product(params, x, targets, v, key=None):
        outputs, jv = jax.jvp(lambda p: model.apply(p, x, key), (params,), (v,))
        hjv = jax.jvp(jax.grad(lambda o: objective.loss.value(o, targets)), (outputs,),
                      (jv,))[1]
        (gv,) = jax.vjp(lambda p: model.apply(p, x, key), params)[1](hjv)

        def penalty(p):
            return jnp.asarray(losses.l2_penalty(p, objective.l2, outputs.shape[0]),
                               outputs.dtype)

        return jax.tree.map(jnp.add, gv, jax.jvp(jax.grad(penalty), (params,), (v,))[1])

    return product


def hessian_product_reference(model: Layer, objective: Objective):
    """H v by jax alone, the reference for `engines.hessian_product`: `jax.jvp` of `jax.grad`
    of E (the model's apply, the loss's value and the L2 penalty; forward over reverse).
    Returns `product(params, x, targets, v, key=None)` (key: the model's dropout masks)."""

    def product(params, x, targets, v, key=None):
        def energy(p):
            return objective.value(p, model.apply(p, x, key), targets)

        return jax.jvp(jax.grad(energy), (params,), (v,))[1]

    return product


def hidden_state_product_reference(model: Layer, layers: int):
    """J_h^T J_h v / m by jax alone, the reference for `engines.hidden_state_product`: `jax.jvp`
    and `jax.vjp` of the apply of the `serial` model's first `layers` sublayers, zero for the
    later layers' params. Returns `product(params, x, v)`."""
    prefix = serial(*model.sublayers[:layers])

    def product(params, x, v):
        head = tuple(params[:layers])
        hidden, dhidden = jax.jvp(lambda p: prefix.apply(p, x), (head,), (tuple(v[:layers]),))
        (back,) = jax.vjp(lambda p: prefix.apply(p, x), head)[1](dhidden / hidden.shape[0])
        return tuple(back) + jax.tree.map(jnp.zeros_like, tuple(params[layers:]))

    return product


def hessian_diagonal(model: Layer, objective: Objective, params: Any, x: jax.Array,
                     targets: jax.Array) -> Any:
    """jnp.diag(jax.hessian(E)) over all parameters: the true second derivatives (compiled as
    one program, as `gauss_newton_diagonal`)."""
    def diagonal(params, x, targets):
        flat, unravel, energy = _flat_function(
            lambda p: objective.value(p, model.apply(p, x), targets), params)
        return unravel(jnp.diag(jax.hessian(energy)(flat)))

    return jax.jit(diagonal)(params, x, targets)
