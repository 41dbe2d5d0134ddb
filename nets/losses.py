"""Losses with hand-written gradients, and the lecture's objective.

A loss is `value(outputs, targets) -> scalar` with `grad(outputs, targets) -> d value /
d outputs`, written by hand. Shapes: outputs and targets are both (batch, classes); every loss
is a mean over the m examples of the batch of a sum over outputs.

The lecture's objective adds the L2 penalty of the weights (biases excluded):

    E(w) = -(1/m) sum_i sum_k [y_ik log s_ik + (1 - y_ik) log(1 - s_ik)]
           + lambda/(2m) sum_l sum_ij (w^l_ij)^2,          s = sigmoid(z^L).

Its weight gradient is (lambda/m) w. The lecture's slides write (lambda/2m) w: that is a slip,
as the derivative of lambda/(2m) w^2 is (lambda/m) w, and tests/test_losses.py shows jax.grad
agrees with lambda/m and not with lambda/2m.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from nets.layers import concrete_values, is_finite_number
from nets.varying import split_like

__all__ = [
    "Loss",
    "Objective",
    "sigmoid_cross_entropy",
    "mean_squared_error",
    "softmax_cross_entropy",
    "lecun1998_map",
    "lecture_output_error",
    "lecture_objective",
    "l2_penalty",
    "l2_penalty_grad",
    "is_weight",
    "check_l2",
]


class Loss(NamedTuple):
    """`value(outputs, targets) -> scalar`, `grad(outputs, targets) -> (batch, classes)`.

    `curvature(outputs, targets) -> (batch, classes)` is the diagonal of the loss's Hessian
    with respect to the outputs (the Gauss-Newton matrix of the loss itself), where defined.
    `hessian_vector(outputs, targets, u) -> (batch, classes)` is that whole Hessian times u
    (batch, classes): H u, H block-diagonal with one (classes, classes) block per example (the
    middle factor of the Gauss-Newton product J^T H J v, `nets.engines.gauss_newton_product`).
    `check_targets(targets)` raises ValueError for target values the loss cannot take (a
    sigmoid cross-entropy's outside [0, 1]); every function above runs it on concrete
    targets, and the training procedures run it on the whole set before they compile. Inside
    a trace (jit, vmap, grad, scan) the values are unknown and it checks nothing.
    """

    name: str
    value: Callable[[jax.Array, jax.Array], jax.Array]
    grad: Callable[[jax.Array, jax.Array], jax.Array]
    curvature: Callable[[jax.Array, jax.Array], jax.Array] | None = None
    hessian_vector: Callable[[jax.Array, jax.Array, jax.Array], jax.Array] | None = None
    check_targets: Callable[[jax.Array], None] | None = None


def _check_pair(name: str, outputs: jax.Array, targets: jax.Array) -> None:
    if outputs.ndim != 2 or outputs.shape != targets.shape:
        raise ValueError(
            f"{name}: outputs have shape {tuple(outputs.shape)} and targets "
            f"{tuple(targets.shape)}; expected equal shapes (batch, classes)"
        )
    if outputs.shape[0] == 0:  # a mean over no examples: NaN, and lambda/(2m) divides by 0
        raise ValueError(f"{name}: outputs have shape {tuple(outputs.shape)}; expected a "
                         "batch of at least one example")


_UNIT = "each the probability that its output is on: outside [0, 1] the loss has no minimum"
_MASS = ("a class's weight, one-hot, soft or several: with a negative one the loss has no "
         "minimum")


def _targets_within(name: str, low: float, high: float, why: str) -> Callable[[jax.Array], None]:
    """A check_targets refusing concrete targets that are not finite or lie outside [low,
    high], naming the first such value and its index (example, output)."""
    if high == np.inf:
        expected = "finite" if low == -np.inf else f"finite and >= {low:g}"
    else:
        expected = f"finite and in [{low:g}, {high:g}]"

    def check_targets(targets):
        values = concrete_values(targets)
        if values is None:
            return
        bad = ~(np.isfinite(values) & (values >= low) & (values <= high))
        if bad.any():
            where = tuple(int(i) for i in np.argwhere(bad)[0])
            raise ValueError(f"{name}: targets must be {expected} ({why}); found "
                             f"{values[where].item()!r} at {where} ({int(bad.sum())} of the "
                             f"{values.size} values)")

    return check_targets


def _checked(name: str, value, grad, curvature, hessian_vector, check_targets) -> Loss:
    """The loss with every function checking its outputs and targets (and u) first. Without
    a `hessian_vector`, the Hessian is the diagonal `curvature`: H u = curvature * u."""
    def check(outputs, targets):
        _check_pair(name, outputs, targets)
        check_targets(targets)

    def checked(function):
        def run(outputs, targets):
            check(outputs, targets)
            return function(outputs, targets)

        return run

    def checked_product(outputs, targets, u):
        check(outputs, targets)
        if u.shape != outputs.shape:
            raise ValueError(f"{name}: hessian_vector's u has shape {tuple(u.shape)}, expected "
                             f"the outputs' {tuple(outputs.shape)}")
        if hessian_vector is None:
            return curvature(outputs, targets) * u
        return hessian_vector(outputs, targets, u)

    return Loss(name, checked(value), checked(grad), checked(curvature), checked_product,
                check_targets)


def _softmax_hessian_vector(p: jax.Array, row_mass: jax.Array, u: jax.Array) -> jax.Array:
    """(diag(p) - p p^T) u per row, times the row's target mass, over m: the Hessian of
    mass * log(sum_k e^z_k) (and of the MAP criterion's log partition, where p sums below 1)."""
    return row_mass * p * (u - jnp.sum(p * u, axis=-1, keepdims=True)) / p.shape[0]


def lecture_output_error(sigma: jax.Array, targets: jax.Array) -> jax.Array:
    """The lecture's output error dE/ds^L = -y/s + (1 - y)/(1 - s), per example.

    (The second slide prints the first term with a + sign: a typo; this is the derivative of
    -[y log s + (1 - y) log(1 - s)].) Divide by m for the batch mean.
    """
    return -targets / sigma + (1 - targets) / (1 - sigma)


def sigmoid_cross_entropy(from_logits: bool = True) -> Loss:
    """Multi-output sigmoid cross-entropy, mean over examples, sum over outputs.

    from_logits=True: outputs are the logits z and the value is computed stably as
        (1/m) sum [softplus(z) - y z],  softplus(z) = log(1 + exp(z)) = max(z, 0) + log(1 +
    exp(-|z|)), written with jax.nn.softplus so that jax.grad of the value has its slope
    sigmoid(0) = 1/2 at z = 0 (the max/abs form's subgradients gave jax.grad -y there),
    with gradient (sigmoid(z) - y)/m: the lecture's output error dE/ds times the sigmoid
    derivative s(1 - s), simplified (the product is exact; the simplification avoids 0/0
    when s rounds to 0 or 1).
    from_logits=False: outputs are the probabilities s in (0, 1) and the gradient is the
    lecture's dE/ds = (-y/s + (1 - y)/(1 - s))/m, to be backpropagated through a Sigmoid layer.
    Anything but a bool is a ValueError (a string such as "no" was read as true).
    """
    if not isinstance(from_logits, (bool, np.bool_)):
        raise ValueError(f"sigmoid_cross_entropy: from_logits must be True or False, got "
                         f"{from_logits!r}")
    if from_logits:

        def value(z, y):
            m = z.shape[0]
            per_output = jax.nn.softplus(z) - y * z
            return jnp.sum(per_output) / m

        def grad(z, y):
            return (jax.nn.sigmoid(z) - y) / z.shape[0]

        def curvature(z, y):
            s = jax.nn.sigmoid(z)
            del y
            return s * (1 - s) / z.shape[0]

        return _checked("sigmoid_cross_entropy", value, grad, curvature, None,
                        _targets_within("sigmoid_cross_entropy", 0, 1, _UNIT))

    def value_from_probabilities(s, y):
        m = s.shape[0]
        return -jnp.sum(y * jnp.log(s) + (1 - y) * jnp.log1p(-s)) / m

    def grad_from_probabilities(s, y):
        return lecture_output_error(s, y) / s.shape[0]

    def curvature_from_probabilities(s, y):
        return (y / s**2 + (1 - y) / (1 - s) ** 2) / s.shape[0]

    name = "sigmoid_cross_entropy(probabilities)"
    return _checked(name, value_from_probabilities, grad_from_probabilities,
                    curvature_from_probabilities, None, _targets_within(name, 0, 1, _UNIT))


def mean_squared_error() -> Loss:
    """E = (1/(2m)) sum_i sum_k (o_ik - t_ik)^2, gradient (o - t)/m.

    The loss of the 1989 nets, with targets +-1 (LeCun et al. 1989 used targets of +-1 and a
    scaled tanh output).
    """

    def value(o, t):
        return 0.5 * jnp.sum((o - t) ** 2) / o.shape[0]

    def grad(o, t):
        return (o - t) / o.shape[0]

    def curvature(o, t):
        del t
        return jnp.ones_like(o) / o.shape[0]

    return _checked("mean_squared_error", value, grad, curvature, None,
                    _targets_within("mean_squared_error", -np.inf, np.inf,
                                    "a NaN or infinite one makes it NaN or inf"))


def softmax_cross_entropy() -> Loss:
    """E = -(1/m) sum_i sum_k y_ik log softmax(z_i)_k from logits z.

    Gradient (softmax(z) * sum_k y_k - y)/m, which is (softmax(z) - y)/m for one-hot rows.
    Hessian per example (diag(p) - p p^T) sum_k y_k / m, p = softmax(z): not diagonal.
    """

    def value(z, y):
        return -jnp.sum(y * jax.nn.log_softmax(z, axis=-1)) / z.shape[0]

    def grad(z, y):
        row_mass = jnp.sum(y, axis=-1, keepdims=True)
        return (jax.nn.softmax(z, axis=-1) * row_mass - y) / z.shape[0]

    def curvature(z, y):
        p = jax.nn.softmax(z, axis=-1)
        return p * (1 - p) * jnp.sum(y, axis=-1, keepdims=True) / z.shape[0]

    def hessian_vector(z, y, u):
        return _softmax_hessian_vector(jax.nn.softmax(z, axis=-1),
                                       jnp.sum(y, axis=-1, keepdims=True), u)

    return _checked("softmax_cross_entropy", value, grad, curvature, hessian_vector,
                    _targets_within("softmax_cross_entropy", 0, np.inf, _MASS))


def lecun1998_map(j: float = 10.0) -> Loss:
    """The MAP criterion of LeCun et al. 1998 (eq. 9), on the scores s = -y of
    `nets.layers.EuclideanRBF` (y_i the penalty of class i):

        E = (1/m) sum_p [ y_Dp + log(e^-j + sum_i e^-y_ip) ]
          = -(1/m) sum_p [ sum_k t_k s_k - (sum_k t_k) log(e^-j + sum_i e^s_i) ],

    D_p the correct class (one-hot targets t; the second form is the one computed). The first
    term pulls the correct penalty down; the second pushes the others up, and e^-j, a constant
    penalty-j "rubbish" class, stops pushing a class whose penalty is already well above j
    (the paper: "j is positive"; it gives no value). Without the e^-j term it is the softmax
    cross-entropy of the scores.
    Gradient (q sum_k t_k - t)/m, q_i = e^s_i / (e^-j + sum_k e^s_k) (q sums to less than 1);
    curvature, the exact diagonal of the Hessian in s: q (1 - q) sum_k t_k / m; the whole
    Hessian per example (diag(q) - q q^T) sum_k t_k / m.
    """
    # "a" was a raw TypeError and True read as 1; j = inf drops the rubbish class (softmax)
    if not ((is_finite_number(j) or (isinstance(j, (float, np.floating)) and j == np.inf))
            and j > 0):
        raise ValueError(f"lecun1998_map: j must be > 0, got {j!r}; expected a number")

    def log_partition(s):
        rubbish = split_like(jnp.full((*s.shape[:-1], 1), -j, s.dtype), s)
        return jax.nn.logsumexp(jnp.concatenate([s, rubbish], axis=-1), axis=-1, keepdims=True)

    def value(s, t):
        row_mass = jnp.sum(t, axis=-1, keepdims=True)
        return (jnp.sum(row_mass * log_partition(s)) - jnp.sum(t * s)) / s.shape[0]

    def grad(s, t):
        q = jnp.exp(s - log_partition(s))
        return (q * jnp.sum(t, axis=-1, keepdims=True) - t) / s.shape[0]

    def curvature(s, t):
        q = jnp.exp(s - log_partition(s))
        return q * (1 - q) * jnp.sum(t, axis=-1, keepdims=True) / s.shape[0]

    def hessian_vector(s, t, u):
        return _softmax_hessian_vector(jnp.exp(s - log_partition(s)),
                                       jnp.sum(t, axis=-1, keepdims=True), u)

    return _checked("lecun1998_map", value, grad, curvature, hessian_vector,
                    _targets_within("lecun1998_map", 0, np.inf, _MASS))


def is_weight(path: tuple[Any, ...]) -> bool:
    """Whether a params leaf, given by its pytree path, is a weight (key "w")."""
    return bool(path) and getattr(path[-1], "key", None) == "w"


def l2_penalty(params: Any, l2: float, m: int) -> jax.Array:
    """lambda/(2m) * sum of the squared weights ("w" leaves; biases excluded).

    A Python lambda of 0 gives an exact 0 without touching the weights (so that XLA drops
    the sums, and an infinite weight does not make the penalty NaN)."""
    check_l2("l2_penalty", l2, m)
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    if _is_zero(l2):
        arrays = [leaf for _, leaf in leaves]
        return jnp.zeros((), jnp.result_type(*arrays) if arrays else float)
    sum_of_squares = sum(jnp.sum(leaf**2) for path, leaf in leaves if is_weight(path))
    return l2 / (2 * m) * jnp.asarray(sum_of_squares)


def l2_penalty_grad(params: Any, l2: float, m: int) -> Any:
    """d/dparams of `l2_penalty`: (lambda/m) w for weights, 0 for the rest (all 0 for a
    Python lambda of 0)."""
    check_l2("l2_penalty_grad", l2, m)
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: (l2 / m) * leaf if is_weight(path) and not _is_zero(l2)
        else jnp.zeros_like(leaf), params
    )


def check_l2(name: str, l2: Any, m: Any = 1) -> None:
    """A lambda below 0 (or NaN) would reward large weights, an infinite one make every
    weight's penalty inf (NaN at 0): ValueError, for a Python or NumPy number or a concrete
    0-d array alike (a NumPy float32 or a jnp scalar went unchecked). A traced one (swept
    under vmap) is the caller's to check. m, the batch's examples, is a finite number > 0 (0
    divided by zero, a negative m turned the penalty into a reward); not necessarily whole:
    DP-SGD's Poisson batches divide by their expected size q N (`parallel.
    private_value_and_grad`), which may also be traced."""
    if not (isinstance(m, jax.core.Tracer) or (is_finite_number(m) and m > 0)):
        raise ValueError(f"{name}: m, the number of examples, must be a finite number > 0, "
                         f"got {m!r}")
    if isinstance(l2, jax.core.Tracer):
        return
    if not (is_finite_number(l2) and l2 >= 0):
        raise ValueError(f"{name}: the L2 coefficient lambda must be >= 0, got {l2!r}; "
                         "expected a finite number")


def _is_zero(l2: Any) -> bool:
    return isinstance(l2, (int, float)) and l2 == 0


class Objective(NamedTuple):
    """A loss on the outputs plus lambda/(2m) times the sum of squared weights."""

    loss: Loss
    l2: float = 0.0

    def value(self, params: Any, outputs: jax.Array, targets: jax.Array) -> jax.Array:
        """E(params) given the model's outputs on a batch of m examples."""
        m = outputs.shape[0]
        return self.loss.value(outputs, targets) + l2_penalty(params, self.l2, m)


def lecture_objective(l2: float = 0.0, from_logits: bool = True) -> Objective:
    """The lecture's E(w): sigmoid cross-entropy plus lambda/(2m) sum w^2 (module docstring)."""
    if not (isinstance(l2, jax.core.Tracer) or (is_finite_number(l2) and l2 >= 0)):
        # NaN and inf passed `l2 < 0`, to be refused by the first l2_penalty
        raise ValueError(f"lecture_objective: l2 must be >= 0, got {l2!r}; expected a finite "
                         "number")
    return Objective(sigmoid_cross_entropy(from_logits=from_logits), l2)
