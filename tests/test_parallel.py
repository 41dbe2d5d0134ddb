"""training.parallel: per-example gradients against a loop, clipping, DP-SGD, picking, and the
data-parallel step in its three forms against one device.

In-process tests use the 2 CPU devices of conftest (float64, tolerance 1e-10). The 4-device
check runs this file as a script in a subprocess with XLA_FLAGS set before JAX starts (the
device count is fixed once JAX has started): every form and engine on the MLP, LeNet-1989 and
an LSTM, float32 with matmul precision "highest", tolerance 1e-5.
"""
import json
import os
import pathlib
import re
import subprocess
import sys

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import nets
from nets import engines, models, recurrent
from nets.gradcheck import relative_error
from tests.helpers import F64, assert_close_tree, random_batch
from training import distributed, metrics, parallel

ROOT = pathlib.Path(__file__).resolve().parents[1]
ENGINES = {"manual": engines.manual, "autodiff": engines.autodiff}
FLOAT32 = 1e-5  # the float32 tolerance of nets.gradcheck.TOLERANCES
WHOLE_PROGRAM = ("jit", "explicit")  # the forms that run the single-device step's program


# --- problems --------------------------------------------------------------------------------

def mlp_problem(batch, dtype, seed=0, l2=0.3):
    model = nets.build_mlp(6, 3, hidden_units=10)
    params = model.init(jax.random.key(seed), (-1, 6))[1]
    x, targets = random_batch(jax.random.key(seed + 1), batch, 6, 3, dtype)
    return model, nets.lecture_objective(l2), cast(params, dtype), x, targets


def lenet_problem(batch, dtype, seed=0):
    model = models.lenet1989()
    params = model.init(jax.random.key(seed), (-1, 16, 16, 1))[1]
    x_key, label_key = jax.random.split(jax.random.key(seed + 1))
    x = jax.random.uniform(x_key, (batch, 16, 16, 1), dtype, -1, 1)
    targets = 2 * jax.nn.one_hot(jax.random.randint(label_key, (batch,), 0, 10), 10,
                                 dtype=dtype) - 1
    return model, nets.Objective(nets.mean_squared_error(), 0.1), cast(params, dtype), x, targets


def lstm_problem(batch, dtype, seed=0, time=5, features=3, classes=4):
    model = recurrent.sequence_model([recurrent.lstm(6)], classes)
    params = model.init(jax.random.key(seed), (-1, time, features))[1]
    x_key, label_key = jax.random.split(jax.random.key(seed + 1))
    x = jax.random.normal(x_key, (batch, time, features), dtype)
    targets = jax.random.randint(label_key, (batch, time), 0, classes)
    return (model, nets.Objective(recurrent.sequence_cross_entropy(), 0.05), cast(params, dtype),
            x, targets)


def dropout_problem(batch, dtype):
    """6 -> 10 (ReLU, dropout 0.5) -> 3, the lecture's objective with L2."""
    model = nets.serial(nets.Dense(10, name="hidden"), nets.Relu(), nets.Dropout(0.5),
                        nets.Dense(3, name="output"))
    params = model.init(jax.random.key(0), (-1, 6))[1]
    x, targets = random_batch(jax.random.key(1), batch, 6, 3, dtype)
    return model, nets.lecture_objective(0.3), cast(params, dtype), x, targets


PROBLEMS = {"mlp": mlp_problem, "lenet1989": lenet_problem, "lstm": lstm_problem}


def lenet5_problem(batch, dtype):
    """LeNet-5 (its C3 table, trainable subsampling, C5 a convolution seeing its whole input)
    on 32 x 32 inputs, softmax cross-entropy with L2."""
    model = models.lenet5()
    params = model.init(jax.random.key(0), (-1, 32, 32, 1))[1]
    x_key, label_key = jax.random.split(jax.random.key(1))
    x = jax.random.normal(x_key, (batch, 32, 32, 1), dtype)
    targets = jax.nn.one_hot(jax.random.randint(label_key, (batch,), 0, 10), 10, dtype=dtype)
    return model, nets.Objective(nets.softmax_cross_entropy(), 0.2), cast(params, dtype), x, targets


def gram_conv_problem(batch, dtype):
    """A convolution with few windows and a large kernel, so that its weights' norms come from
    the Gram matrices over T = 9 windows (9 (72 + 16) <= 72 x 16), padded unevenly with -1;
    then one with unshared biases and a stride, and a Dense output; MSE with L2."""
    model = nets.serial(
        nets.Conv2D(16, 3, padding=((1, 0), (0, 1)), pad_value=-1.0, name="gram"), nets.Tanh(),
        nets.Conv2D(5, 2, stride=2, unshared_bias=True, name="unshared"), nets.Tanh(),
        nets.Flatten(), nets.Dense(3))
    params = model.init(jax.random.key(0), (-1, 4, 4, 8))[1]
    x = jax.random.normal(jax.random.key(1), (batch, 4, 4, 8), dtype)
    targets = jax.random.normal(jax.random.key(2), (batch, 3), dtype)
    return model, nets.Objective(nets.mean_squared_error(), 0.1), cast(params, dtype), x, targets


def cast(tree, dtype):
    return jax.tree.map(lambda leaf: leaf.astype(dtype), tree)


def single_example_energy(model, objective, batch):
    """E_i by hand: the loss on example i alone plus lambda/(2m) sum w^2, m the batch size."""

    def energy(params, x_i, target_i):
        outputs = model.apply(params, x_i[None])
        leaves = jax.tree_util.tree_flatten_with_path(params)[0]
        weights = sum(jnp.sum(leaf ** 2) for path, leaf in leaves if nets.losses.is_weight(path))
        return (objective.loss.value(outputs, target_i[None])
                + objective.l2 / (2 * batch) * weights)

    return energy


# --- per example -----------------------------------------------------------------------------

def flat_rows(grads):
    """Per-example gradients as a (batch, parameters) NumPy matrix."""
    return np.asarray(jax.vmap(lambda g: jax.flatten_util.ravel_pytree(g)[0])(grads))


@pytest.fixture(scope="module")
def mlp_case():
    """One float64 MLP batch and its per-example values and gradients (manual engine)."""
    model, objective, params, x, targets = mlp_problem(16, jnp.float64)
    values, grads = jax.jit(parallel.per_example_value_and_grad(model, objective))(
        params, x, targets)
    return model, objective, params, x, targets, values, grads


@pytest.mark.parametrize("name, engine", [("mlp", "manual"), ("mlp", "autodiff"),
                                          ("lenet1989", "manual"), ("lstm", "manual")])
def test_per_example_gradients_equal_a_loop_over_examples(name, engine):
    batch = 4
    model, objective, params, x, targets = PROBLEMS[name](batch, jnp.float64)
    values, grads = jax.jit(parallel.per_example_value_and_grad(
        model, objective, ENGINES[engine]))(params, x, targets)
    one_example = jax.jit(jax.value_and_grad(single_example_energy(model, objective, batch)))
    loop = [one_example(params, x[i], targets[i]) for i in range(batch)]

    rows = flat_rows(grads)
    assert relative_error(rows[0], rows[1]) > 0.05  # really one gradient per example
    for i, (value, grad) in enumerate(loop):
        assert abs(float(values[i]) - float(value)) <= F64 * abs(float(value))
        assert_close_tree(jax.tree.map(lambda leaf, i=i: leaf[i], grads), grad, jnp.float64,
                          f"{name}/{engine} example {i}")


@pytest.mark.parametrize("engine", ["manual", "autodiff"])
def test_per_example_gradients_with_dropout_equal_a_loop_with_split_keys(engine):
    """Example i draws its masks from split(key, m)[i]: against jax.grad of example i's energy
    with that key, one example at a time."""
    batch = 4
    model, objective, params, x, targets = dropout_problem(batch, jnp.float64)
    key = jax.random.key(9)
    values, grads = jax.jit(parallel.per_example_value_and_grad(
        model, objective, ENGINES[engine]))(params, x, targets, key)
    penalty = jax.jit(lambda p: nets.losses.l2_penalty(p, objective.l2, batch))

    def energy(params, x_i, target_i, key_i):
        return objective.loss.value(model.apply(params, x_i[None], key_i),
                                    target_i[None]) + penalty(params)

    one_example = jax.jit(jax.value_and_grad(energy))
    for i, key_i in enumerate(jax.random.split(key, batch)):
        value, grad = one_example(params, x[i], targets[i], key_i)
        assert abs(float(values[i]) - float(value)) <= F64 * abs(float(value))
        assert_close_tree(jax.tree.map(lambda leaf, i=i: leaf[i], grads), grad, jnp.float64,
                          f"{engine} example {i}")
    without = jax.jit(parallel.per_example_value_and_grad(model, objective))(params, x,
                                                                            targets)[0]
    assert float(jnp.max(jnp.abs(without - values))) > 1e-3  # the masks were drawn


def test_private_gradient_with_dropout_draws_masks_from_its_key():
    model, objective, params, x, targets = dropout_problem(4, jnp.float64)
    private = jax.jit(parallel.private_value_and_grad(model, objective, clip_norm=0.5))
    key = jax.random.key(2)
    first, again = private(params, x, targets, key), private(params, x, targets, key)
    assert_close_tree(again, first, jnp.float64, "same key")
    other = private(params, x, targets, jax.random.key(3))
    assert abs(float(other[0]) - float(first[0])) > 1e-6
    assert abs(float(private(params, x, targets)[0]) - float(first[0])) > 1e-6


@pytest.mark.parametrize("engine", ["manual", "autodiff"])
def test_mean_of_per_example_gradients_is_the_batch_gradient(engine):
    model, objective, params, x, targets = mlp_problem(8, jnp.float64)
    values, grads = jax.jit(parallel.per_example_value_and_grad(
        model, objective, ENGINES[engine]))(params, x, targets)
    energy, grad = jax.jit(ENGINES[engine](model, objective))(params, x, targets)
    assert abs(float(jnp.mean(values)) - float(energy)) <= F64 * float(energy)
    assert_close_tree(jax.tree.map(lambda leaf: jnp.mean(leaf, axis=0), grads), grad,
                      jnp.float64, "mean per-example")


def test_clipping_bounds_each_norm_and_keeps_small_gradients(mlp_case):
    *_, grads = mlp_case
    flat = flat_rows(grads)
    norms = np.asarray(jax.jit(parallel.gradient_norms)(grads))
    np.testing.assert_allclose(norms, np.linalg.norm(flat, axis=1), rtol=1e-12)
    bound = float(np.median(norms))
    clipped, before = jax.jit(parallel.clip_gradients, static_argnums=1)(grads, bound)
    flat_clipped = flat_rows(clipped)
    after = np.linalg.norm(flat_clipped, axis=1)
    assert (norms > bound).any() and (norms < bound).any()
    np.testing.assert_allclose(before, norms)
    np.testing.assert_allclose(after, np.minimum(norms, bound), rtol=1e-12)
    small = norms < bound
    np.testing.assert_array_equal(flat_clipped[small], flat[small])
    cosine = np.sum(flat_clipped * flat, axis=1) / (after * norms)
    np.testing.assert_allclose(cosine, 1.0, rtol=1e-12)  # directions kept
    zero, _ = parallel.clip_gradients({"w": jnp.zeros((3, 2))}, 1.0)
    np.testing.assert_array_equal(zero["w"], 0.0)
    with pytest.raises(ValueError, match="max_norm"):
        parallel.clip_gradients(grads, 0.0)


@pytest.mark.parametrize("per_example", parallel.PER_EXAMPLE_NORMS)
def test_private_gradient_clips_the_data_term_and_adds_scaled_noise(mlp_case, per_example):
    """Either way of computing the clipped sum ("vmap" forms every example's gradient,
    "ghost" never does) against NumPy's clipping of the per-example gradients."""
    model, objective, params, x, targets, values, grads = mlp_case
    batch = x.shape[0]
    energy, grad = jax.jit(engines.autodiff(model, objective))(params, x, targets)
    # a bound no example reaches: the plain batch gradient
    loose_energy, loose_grad = jax.jit(parallel.private_value_and_grad(
        model, objective, clip_norm=1e6, per_example=per_example))(params, x, targets)
    assert abs(float(loose_energy) - float(energy)) <= F64 * float(energy)
    assert_close_tree(loose_grad, grad, jnp.float64, "unclipped")

    # the data term alone is each example's gradient less its share of the penalty
    penalty = jax.flatten_util.ravel_pytree(
        nets.losses.l2_penalty_grad(params, objective.l2, batch))[0]
    data = flat_rows(grads) - np.asarray(penalty)[None, :]
    norms = np.linalg.norm(data, axis=1)
    clip = float(np.min(norms)) / 2
    expected = (data * (clip / norms)[:, None]).mean(axis=0) + np.asarray(penalty)
    sigma = 2.0
    noisy = jax.jit(parallel.private_value_and_grad(model, objective, clip_norm=clip,
                                                    noise_multiplier=sigma,
                                                    per_example=per_example))
    with pytest.raises(ValueError, match="key"):
        noisy(params, x, targets)
    key = jax.random.key(3)
    draws = jax.flatten_util.ravel_pytree(noisy(params, x, targets, key)[1])[0]
    np.testing.assert_array_equal(draws, jax.flatten_util.ravel_pytree(
        noisy(params, x, targets, key)[1])[0])  # the key alone decides the noise
    tight = parallel.private_value_and_grad(model, objective, clip_norm=clip,
                                            per_example=per_example)
    np.testing.assert_allclose(jax.flatten_util.ravel_pytree(
        jax.jit(tight)(params, x, targets)[1])[0], expected, rtol=1e-10)
    noise = (np.asarray(draws) - expected) / (sigma * clip / batch)
    assert noise.size > 100
    assert abs(noise.std() - 1) < 0.2 and abs(noise.mean()) < 4 / np.sqrt(noise.size)


@pytest.mark.parametrize("per_example", parallel.PER_EXAMPLE_NORMS)
def test_private_gradient_of_a_padded_poisson_batch(mlp_case, per_example):
    """A Poisson-drawn batch padded to a fixed size: weights 1 on the drawn examples and 0 on
    the padding rows, expected_batch = q N. Against NumPy: the drawn examples' clipped data
    gradients summed and divided by expected_batch, plus (lambda / expected_batch) w; E the
    drawn examples' mean loss plus lambda / (2 expected_batch) sum w^2. The padding rows
    change nothing (scaled by 1e3, the same within 1e-10); the noise has standard deviation
    sigma C / expected_batch. Both ways of computing the clipped sum."""
    model, objective, params, x, targets, values, grads = mlp_case
    batch = x.shape[0]
    drawn = np.arange(batch) % 3 != 1
    weights = jnp.asarray(drawn, jnp.float64)
    expected_batch = 9.5
    penalty_m = jax.flatten_util.ravel_pytree(
        nets.losses.l2_penalty_grad(params, objective.l2, batch))[0]
    data = flat_rows(grads) - np.asarray(penalty_m)[None, :]
    norms = np.linalg.norm(data, axis=1)
    clip = float(np.median(norms[drawn]))
    penalty = jax.flatten_util.ravel_pytree(
        nets.losses.l2_penalty_grad(params, objective.l2, expected_batch))[0]
    expected = ((data * np.minimum(1, clip / norms)[:, None])[drawn].sum(axis=0)
                / expected_batch + np.asarray(penalty))
    losses = np.asarray(values) - float(nets.losses.l2_penalty(params, objective.l2, batch))
    expected_energy = (losses[drawn].mean()
                       + float(nets.losses.l2_penalty(params, objective.l2, expected_batch)))
    private = jax.jit(parallel.private_value_and_grad(model, objective, clip_norm=clip,
                                                      per_example=per_example))
    energy, grad = private(params, x, targets, weights=weights, expected_batch=expected_batch)
    assert relative_error(jax.flatten_util.ravel_pytree(grad)[0], expected) <= F64
    assert abs(float(energy) - expected_energy) <= F64 * abs(expected_energy)
    padded = jnp.where(jnp.asarray(drawn)[:, None], x, 1e3 * x)
    again = private(params, padded, targets, weights=weights, expected_batch=expected_batch)
    assert relative_error(jax.flatten_util.ravel_pytree(again[1])[0], expected) <= F64
    sigma = 2.0
    noisy = jax.jit(parallel.private_value_and_grad(model, objective, clip_norm=clip,
                                                    noise_multiplier=sigma,
                                                    per_example=per_example))
    draws = jax.flatten_util.ravel_pytree(noisy(params, x, targets, jax.random.key(3),
                                                weights=weights,
                                                expected_batch=expected_batch)[1])[0]
    noise = (np.asarray(draws) - expected) / (sigma * clip / expected_batch)
    assert abs(noise.std() - 1) < 0.2 and abs(noise.mean()) < 4 / np.sqrt(noise.size)
    unjitted = parallel.private_value_and_grad(model, objective, clip_norm=clip)
    with pytest.raises(ValueError, match=r"weights must have shape \(16,\), one per example, "
                                         r"got \(3,\)"):
        unjitted(params, x, targets, weights=weights[:3])
    with pytest.raises(ValueError, match="expected_batch must be > 0, got 0"):
        unjitted(params, x, targets, weights=weights, expected_batch=0)


GHOST_MLPS = {
    "sigmoid_lecture": (dict(hidden_layers=2, hidden_units=7), nets.lecture_objective(0.0)),
    "probabilities": (dict(hidden_layers=1, hidden_units=5, output_activation="sigmoid"),
                      nets.lecture_objective(0.0, from_logits=False)),
    "tanh_mse": (dict(hidden_layers=2, hidden_units=6, activation="tanh"),
                 nets.Objective(nets.mean_squared_error(), 0.0)),
    "relu_softmax": (dict(hidden_layers=3, hidden_units=8, activation="relu"),
                     nets.Objective(nets.softmax_cross_entropy(), 0.0)),
    "linear": (dict(hidden_layers=0), nets.Objective(nets.softmax_cross_entropy(), 0.0)),
}


@pytest.mark.parametrize("name", sorted(GHOST_MLPS))
def test_ghost_norms_and_clipped_sum_equal_the_per_example_gradients(name):
    """`ghost_clipped_sum` against the per-example gradients of `per_example_value_and_grad`
    (vmap of the manual engine, itself checked against jax.grad per example above): each
    example's gradient norm and the clipped sum at a bound between the smallest and the
    largest norm, float64 within 1e-10. Dropping the bias's share of the norm (the "+ 1")
    fails it."""
    kwargs, objective = GHOST_MLPS[name]
    model = nets.build_mlp(5, 4, **kwargs)
    params = cast(model.init(jax.random.key(0), (-1, 5))[1], jnp.float64)
    x, targets = random_batch(jax.random.key(1), 9, 5, 4, jnp.float64)
    _, grads = jax.jit(parallel.per_example_value_and_grad(model, objective))(params, x,
                                                                              targets)
    norms = np.linalg.norm(flat_rows(grads), axis=1)
    clip = float(np.median(norms))
    energy, ghost_norms, summed = jax.jit(parallel.ghost_clipped_sum(model, objective),
                                          static_argnums=3)(params, x, targets, clip)
    assert relative_error(ghost_norms, norms) <= F64
    expected = (flat_rows(grads) * np.minimum(1, clip / norms)[:, None]).sum(axis=0)
    assert relative_error(jax.flatten_util.ravel_pytree(summed)[0], expected) <= F64
    assert (norms > clip).any() and (norms < clip).any()
    reference = engines.autodiff(model, objective)(params, x, targets)[0]
    assert abs(float(energy) - float(reference)) <= F64 * abs(float(reference))


def test_ghost_private_gradient_with_dropout_and_float32_params():
    """DP-SGD by ghost norms on a net with dropout, the masks from the key as in the vmap
    path (the same gradient within float64's 1e-10, noise included), and float32 params with
    float32 data: float32 gradients within 1e-5 of the vmap path's."""
    model, objective, params, x, targets = dropout_problem(8, jnp.float64)
    for dtype, tolerance in ((jnp.float64, F64), (jnp.float32, FLOAT32)):
        params_d, x_d, targets_d = cast((params, x, targets), dtype)
        results = {}
        for per_example in parallel.PER_EXAMPLE_NORMS:
            private = jax.jit(parallel.private_value_and_grad(
                model, objective, clip_norm=0.3, noise_multiplier=0.5, per_example=per_example))
            results[per_example] = private(params_d, x_d, targets_d, jax.random.key(4))
        ghost, vmapped = results["ghost"], results["vmap"]
        assert all(leaf.dtype == dtype for leaf in jax.tree.leaves(ghost[1]))
        assert abs(float(ghost[0]) - float(vmapped[0])) <= tolerance * abs(float(vmapped[0]))
        assert relative_error(jax.flatten_util.ravel_pytree(ghost[1])[0],
                              jax.flatten_util.ravel_pytree(vmapped[1])[0]) <= tolerance


def wrapped_dropout_problem(batch, dtype):
    """A model that is not serial at the top and draws masks: an MLP behind dropout_after."""
    model = nets.dropout_after(nets.build_mlp(6, 3, hidden_units=5, activation="tanh"), 0.5)
    params = model.init(jax.random.key(0), (-1, 6))[1]
    x, targets = random_batch(jax.random.key(1), batch, 6, 3, dtype)
    return model, nets.Objective(nets.mean_squared_error(), 0.0), cast(params, dtype), x, targets


def embedding_problem(batch, dtype):
    """Integer token ids into an Embedding (parameters, not Dense), flattened, then Dense."""
    model = nets.serial(nets.Embedding(7, 4), nets.Flatten(), nets.Dense(3))
    params = model.init(jax.random.key(0), (-1, 5))[1]
    ids = jax.random.randint(jax.random.key(1), (batch, 5), 0, 7)
    targets = jax.nn.one_hot(jnp.arange(batch) % 3, 3, dtype=dtype)
    return (model, nets.Objective(nets.softmax_cross_entropy(), 0.0), cast(params, dtype), ids,
            targets)


@pytest.mark.parametrize("name", ["lenet1989", "lstm", "wrapped_dropout", "dropout",
                                  "embedding"])
def test_ghost_norms_form_the_other_layers_gradients_per_example(name):
    """Models with layers other than Dense: LeNet-1989 (its convolutions' gradients formed
    per example, its Dense output by ghost norms), an LSTM sequence model and an MLP behind
    `dropout_after` (neither serial at the top: the whole model per example, the latter's
    masks from the key as the vmap path draws them), a serial net with dropout between
    Dense layers, and token ids through an Embedding (integer inputs). Norms and clipped sum
    against the vmap path's per-example gradients under the same key, float64 within 1e-10."""
    problems = {**PROBLEMS, "wrapped_dropout": wrapped_dropout_problem,
                "dropout": dropout_problem, "embedding": embedding_problem}
    model, objective, params, x, targets = problems[name](4, jnp.float64)
    data_objective = objective._replace(l2=0.0)
    key = jax.random.key(5) if model.stochastic else None
    _, grads = parallel.per_example_value_and_grad(model, data_objective)(params, x, targets,
                                                                           key)
    assert_clipped_sum_matches(model, data_objective, (params, x, targets, key), grads)


def assert_clipped_sum_matches(model, objective, args, grads):
    """`ghost_clipped_sum`'s norms and clipped sum against per-example gradients (batch, ...)
    at a bound C between the smallest and largest norm (their median), float64 within 1e-10;
    returns its energy."""
    params, x, targets, key = args
    norms = np.linalg.norm(flat_rows(grads), axis=1)
    clip = float(np.median(norms))
    energy, ghost_norms, summed = jax.jit(parallel.ghost_clipped_sum(model, objective),
                                          static_argnums=3)(params, x, targets, clip, key)
    assert relative_error(ghost_norms, norms) <= F64
    expected = (flat_rows(grads) * np.minimum(1, clip / norms)[:, None]).sum(axis=0)
    assert relative_error(jax.flatten_util.ravel_pytree(summed)[0], expected) <= F64
    return energy


@pytest.mark.parametrize("name", ["mlp", "lenet1989", "lstm", "dropout", "lenet5", "gram_conv"])
def test_ghost_norms_with_the_penalty_share_equal_the_per_example_gradients(name):
    """`ghost_norms` and `ghost_clipped_sum` with lambda > 0: example i's gradient carries
    its penalty share (lambda/m) w (`per_example_value_and_grad`), whose cross term
    2 (lambda/m) <d_i, w> the ghost pass takes from the factors (Gram path) and the formed
    gradients. Values, norms and the clipped sum against the vmap path's per-example
    gradients, float64 within 1e-10 (the MLP, LeNet-1989 with its convolutions formed, the
    LSTM model as one layer, dropout under a key, LeNet-5 with C5 by its Gram matrices and
    C3's table formed, and `gram_conv_problem`'s convolutions by Gram matrices over 9
    windows and over one). Dropping the c^2 ||w||^2 term fails all six, the Gram path's
    cross term the five with Dense layers or such convolutions, the formed gradients' cross
    term LeNet-1989 and the LSTM; keeping only the Gram matrices' diagonals fails
    "gram_conv"."""
    problems = {**PROBLEMS, "dropout": dropout_problem, "lenet5": lenet5_problem,
                "gram_conv": gram_conv_problem}
    model, objective, params, x, targets = problems[name](5, jnp.float64)
    assert objective.l2 > 0
    key = jax.random.key(5) if model.stochastic else None
    values, grads = jax.jit(parallel.per_example_value_and_grad(model, objective))(
        params, x, targets, key)
    norms = np.linalg.norm(flat_rows(grads), axis=1)
    ghost_values, ghost_norms = jax.jit(parallel.ghost_norms(model, objective))(
        params, x, targets, key)
    assert relative_error(ghost_values, values) <= F64
    assert relative_error(ghost_norms, norms) <= F64
    energy = assert_clipped_sum_matches(model, objective, (params, x, targets, key), grads)
    assert abs(float(energy) - float(np.mean(values))) <= F64 * abs(float(np.mean(values)))


@pytest.mark.parametrize("layer, input_shape", [
    (nets.Dense(4), (5,)),
    (nets.Conv2D(3, 3, stride=2, padding="SAME"), (7, 6, 2)),
    (nets.Conv2D(4, (3, 2), padding=((2, 1), (0, 1)), pad_value=-1.0, unshared_bias=True),
     (5, 5, 3)),
    (nets.Conv2D(4, 2, connection_table=np.array([[1, 0, 1, 1], [0, 1, 1, 0]], bool)),
     (4, 4, 2)),
])
def test_factors_give_each_examples_gradient(layer, input_shape):
    """`Layer.factors` against the layer's own backward on each example alone (a batch of
    one; the backward is checked against jax.grad in the layer tests): example n's gradient
    of every leaf is (mask * a[n]^T b[n]).reshape(leaf.shape), float64 within 1e-10. Strides,
    SAME and uneven padding with a pad value, unshared biases and a connection table."""
    params = cast(layer.init(jax.random.key(0), (-1, *input_shape))[1], jnp.float64)
    x = jax.random.normal(jax.random.key(1), (3, *input_shape), jnp.float64)
    y, residuals = layer.forward(params, x)
    dy = jax.random.normal(jax.random.key(2), y.shape, jnp.float64)
    factors = layer.factors(params, x, dy)
    assert sorted(factors) == sorted(params)
    for n in range(x.shape[0]):
        expected = layer.backward(params, layer.forward(params, x[n:n + 1])[1], dy[n:n + 1])[0]
        for key, (a, b, mask) in factors.items():
            product = a[n].T @ b[n]
            product = product if mask is None else product * mask
            assert relative_error(product.reshape(params[key].shape), expected[key]) <= F64


def test_grouped_convolutions_have_no_factors_and_are_formed():
    """A grouped convolution gives no factors (its kernel is block-diagonal): ghost norms form
    its per-example gradients, the same norms as the vmap path's within 1e-10."""
    model = nets.serial(nets.Conv2D(4, 2, feature_group_count=2), nets.Tanh(), nets.Flatten(),
                        nets.Dense(2))
    assert model.sublayers[0].factors is None
    params = cast(model.init(jax.random.key(0), (-1, 3, 3, 2))[1], jnp.float64)
    x = jax.random.normal(jax.random.key(1), (3, 3, 3, 2), jnp.float64)
    targets = jax.random.normal(jax.random.key(2), (3, 2), jnp.float64)
    objective = nets.Objective(nets.mean_squared_error(), 0.1)
    _, grads = jax.jit(parallel.per_example_value_and_grad(model, objective))(params, x,
                                                                              targets)
    _, norms = jax.jit(parallel.ghost_norms(model, objective))(params, x, targets)
    assert relative_error(norms, np.linalg.norm(flat_rows(grads), axis=1)) <= F64


def test_ghost_norms_refuse_what_they_cannot_compute():
    model = nets.build_mlp(6, 3, hidden_units=10, batch_norm=True)
    params = model.init(jax.random.key(0), (-1, 6))[1]
    x, targets = random_batch(jax.random.key(1), 4, 6, 3, jnp.float32)
    objective = nets.lecture_objective(0.0)
    with pytest.raises(ValueError, match=r"ghost_clipped_sum: .*normalise with their batch's "
                                         r"statistics"):
        parallel.private_value_and_grad(model, objective, clip_norm=1.0,
                                        per_example="ghost")(params, x, targets)
    mlp, mlp_objective, *_ = mlp_problem(2, jnp.float64)
    with pytest.raises(ValueError, match="engine must be engines.manual"):
        parallel.private_value_and_grad(mlp, mlp_objective, engines.autodiff, clip_norm=1.0,
                                        per_example="ghost")
    with pytest.raises(ValueError, match=r"per_example must be one of \('vmap', 'ghost'\), "
                                         r"got 'fast'"):
        parallel.private_value_and_grad(mlp, mlp_objective, clip_norm=1.0, per_example="fast")
    with pytest.raises(ValueError, match="pick_hardest_misclassified: per_example='ghost' runs "
                                         "the hand-written backward itself; engine must be "
                                         "engines.manual"):
        parallel.pick_hardest_misclassified(mlp, mlp_objective, engines.autodiff, count=1,
                                            per_example="ghost")
    with pytest.raises(ValueError, match=r"pick_hardest_misclassified: per_example must be one "
                                         r"of \('vmap', 'ghost'\), got 'fast'"):
        parallel.pick_hardest_misclassified(mlp, mlp_objective, count=1, per_example="fast")
    with pytest.raises(ValueError, match=r"ghost_norms: .*normalise with their batch's "
                                         r"statistics"):
        parallel.ghost_norms(model, objective)(params, x, targets)


@pytest.mark.parametrize("per_example", parallel.PER_EXAMPLE_NORMS)
@pytest.mark.parametrize("by", ["grad_norm", "loss"])
def test_pick_hardest_misclassified(mlp_case, by, per_example):
    """The picks against a ranking by NumPy of the vmap path's per-example values and
    gradient norms (lambda = 0.3: the norms include the penalty share), both ways."""
    model, objective, params, x, targets, values, grads = mlp_case
    wrong = np.asarray(metrics.predicted_labels(model.apply(params, x))
                       != metrics.target_labels(targets))
    score = np.linalg.norm(flat_rows(grads), axis=1) if by == "grad_norm" else np.asarray(values)
    count = int(wrong.sum())
    assert 3 <= count < x.shape[0] - 2
    wrong_indices, right_indices = np.flatnonzero(wrong), np.flatnonzero(~wrong)
    for asked in (3, count + 2):  # fewer, then more than are misclassified
        pick = jax.jit(parallel.pick_hardest_misclassified(model, objective, count=asked, by=by,
                                                           per_example=per_example))
        indices, picked_wrong = pick(params, x, targets)
        hardest = np.concatenate([wrong_indices[np.argsort(-score[wrong])],
                                  right_indices[np.argsort(-score[~wrong])]])
        np.testing.assert_array_equal(indices, hardest[:asked])
        np.testing.assert_array_equal(picked_wrong, np.arange(asked) < count)


# --- over devices, in process (2 devices) ----------------------------------------------------

def single_device_steps(model, objective, optimizer, engine, params, x, targets, steps):
    """The reference: the engine on the whole batch, on one device. (first grad, params)."""
    value_and_grad = engine(model, objective)

    @jax.jit
    def step(params, opt_state):
        grad = value_and_grad(params, x, targets)[1]
        updates, opt_state = optimizer.update(grad, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, grad

    opt_state, first_grad = optimizer.init(params), None
    for _ in range(steps):
        params, opt_state, grad = step(params, opt_state)
        first_grad = grad if first_grad is None else first_grad
    return first_grad, params


def data_parallel_steps(model, objective, optimizer, engine, form, params, x, targets, steps,
                        mesh=None):
    """(first grad, params after `steps`, placed batch) from the data-parallel step."""
    run = parallel.data_parallel(model, objective, optimizer, engine=engine, form=form,
                                 mesh=mesh)
    placed_params = run.place_state(params)
    opt_state = run.place_state(optimizer.init(params))
    batch = run.place_batch(np.asarray(x), np.asarray(targets))
    first_grad = None
    for _ in range(steps):
        placed_params, opt_state, _, grad = run.step(placed_params, opt_state, *batch)
        first_grad = run.fetch(grad) if first_grad is None else first_grad
    return first_grad, run.fetch(placed_params), batch


@pytest.mark.standard_promotion  # optax.adam
@pytest.mark.parametrize("engine", ["manual", "autodiff"])
@pytest.mark.parametrize("form", parallel.FORMS)
def test_two_devices_equal_one_device(form, engine):
    assert jax.device_count() == 2
    model, objective, params, x, targets = mlp_problem(8, jnp.float64)
    optimizer = optax.adam(0.05)
    grad, final = single_device_steps(model, objective, optimizer, ENGINES[engine], params, x,
                                      targets, 5)
    dp_grad, dp_final, batch = data_parallel_steps(model, objective, optimizer, ENGINES[engine],
                                                   form, params, x, targets, 5)
    assert len(batch[0].sharding.device_set) == 2  # the batch is split over both devices
    assert relative_error(*(jax.flatten_util.ravel_pytree(t)[0] for t in (
        engines.autodiff(model, objective)(params, x[:4], targets[:4])[1], grad))) > 1e-2
    assert_close_tree(dp_grad, grad, jnp.float64, f"{form}/{engine} gradient")
    assert_close_tree(dp_final, final, jnp.float64, f"{form}/{engine} params after 5 steps")


@pytest.mark.parametrize("form", parallel.FORMS)
def test_batch_norm_over_two_devices_uses_each_shards_statistics_or_the_global_ones(form):
    """"shard_map"/"pmap": each shard normalised with its own statistics, the step the mean
    of the shards' single-device gradients (with lambda/2); "jit" and "explicit": the global
    batch's statistics, the single-device gradient. The shards' statistics differ (the second
    is shifted by 3), so the two expectations differ and each form can meet only its own."""
    # BatchNorm after the activation: a bias just before one would have gradient exactly 0
    model = nets.serial(nets.Dense(4, name="hidden"), nets.Tanh(name="act"),
                        nets.BatchNorm(4, name="norm"), nets.Dense(3, name="out"))
    objective = nets.Objective(nets.softmax_cross_entropy(), 0.1)
    params = nets.gradcheck.astype(model.init(jax.random.key(0), (-1, 5))[1], jnp.float64)
    x = jax.random.normal(jax.random.key(1), (8, 5), jnp.float64)
    x = x.at[4:].add(3.0)
    targets = jax.nn.one_hot(jnp.arange(8) % 3, 3, dtype=jnp.float64)
    run = parallel.data_parallel(model, objective, optax.sgd(0.1), form=form)
    energy, grad = run.value_and_grad(run.place_state(params),
                                      *run.place_batch(np.asarray(x), np.asarray(targets)))
    single = engines.manual(model, objective)(params, x, targets)
    shard = engines.manual(model, objective._replace(l2=objective.l2 / 2))
    shards = [shard(params, x[4 * i:4 * i + 4], targets[4 * i:4 * i + 4]) for i in range(2)]
    per_shard = jax.tree.map(lambda a, b: (a + b) / 2, *shards)
    assert abs(float(single[0]) - float(per_shard[0])) > 1e-3
    expected = single if form in WHOLE_PROGRAM else per_shard
    assert_close_tree(run.fetch((energy, grad)), expected, jnp.float64, form)


@pytest.mark.standard_promotion  # optax.adam
@pytest.mark.parametrize("engine", ["manual", "autodiff"])
@pytest.mark.parametrize("form", parallel.FORMS)
def test_synchronised_batch_norm_over_two_devices_equals_one_device(form, engine):
    """BatchNorm(axis_name=BATCH_AXIS): every form, with either engine, steps as jax.grad on
    the whole batch on one device with plain BatchNorm (the global batch's statistics), over
    three Adam steps, on shards whose statistics differ (the second shifted by 3: the
    shards' own statistics give another gradient, asserted)."""
    def model(norm):
        return nets.serial(nets.Dense(4, name="hidden"), nets.Tanh(name="act"), norm,
                           nets.Dense(3, name="out"))

    synchronised = model(nets.BatchNorm(4, name="norm", axis_name=parallel.BATCH_AXIS))
    plain = model(nets.BatchNorm(4, name="norm"))
    objective = nets.Objective(nets.softmax_cross_entropy(), 0.1)
    params = nets.gradcheck.astype(plain.init(jax.random.key(0), (-1, 5))[1], jnp.float64)
    x = jax.random.normal(jax.random.key(1), (8, 5), jnp.float64).at[4:].add(3.0)
    targets = jax.nn.one_hot(jnp.arange(8) % 3, 3, dtype=jnp.float64)
    optimizer = optax.adam(0.05)
    grad, final = single_device_steps(plain, objective, optimizer, engines.autodiff, params,
                                      x, targets, 3)
    dp_grad, dp_final, _ = data_parallel_steps(synchronised, objective, optimizer,
                                               ENGINES[engine], form, params, x, targets, 3)
    if form not in WHOLE_PROGRAM:
        own_grad = data_parallel_steps(plain, objective, optimizer, ENGINES[engine], form,
                                       params, x, targets, 1)[0]
        assert relative_error(*(jax.flatten_util.ravel_pytree(t)[0]
                                for t in (own_grad, grad))) > 1e-2
    assert_close_tree(dp_grad, grad, jnp.float64, f"{form}/{engine} gradient")
    assert_close_tree(dp_final, final, jnp.float64, f"{form}/{engine} params after 3 steps")


@pytest.mark.parametrize("form", parallel.FORMS)
def test_two_devices_with_dropout_give_each_shard_its_own_masks(form):
    """"jit" and "explicit": the single-device gradient with the same key. "shard_map"/"pmap":
    the mean over the two shards of the single-device gradient of shard i with key
    fold_in(key, i) (and lambda/2, the module docstring's split): a step that gave both
    shards one key, or none, fails it."""
    model, objective, params, x, targets = dropout_problem(8, jnp.float64)
    key = jax.random.key(5)
    run = parallel.data_parallel(model, objective, optax.sgd(0.1), form=form)
    energy, grad = run.value_and_grad(run.place_state(params),
                                      *run.place_batch(np.asarray(x), np.asarray(targets)),
                                      key=key)
    if form in WHOLE_PROGRAM:
        expected = engines.manual(model, objective)(params, x, targets, key)
    else:
        shard = engines.manual(model, objective._replace(l2=objective.l2 / 2))
        shards = [shard(params, x[4 * i:4 * i + 4], targets[4 * i:4 * i + 4],
                        jax.random.fold_in(key, i)) for i in range(2)]
        expected = jax.tree.map(lambda a, b: (a + b) / 2, *shards)
        same_key = [shard(params, x[4 * i:4 * i + 4], targets[4 * i:4 * i + 4], key)
                    for i in range(2)]
        assert relative_error(*(jax.flatten_util.ravel_pytree(t)[0] for t in (
            jax.tree.map(lambda a, b: (a + b) / 2, *same_key)[1], expected[1]))) > 1e-2
    assert_close_tree(run.fetch((energy, grad)), expected, jnp.float64, form)
    inference = engines.manual(model, objective)(params, x, targets)
    assert abs(float(energy) - float(inference[0])) > 1e-3  # the masks were drawn
    # the key may also come positionally, and a step takes it the same way
    state = (run.place_state(params), run.place_state(optax.sgd(0.1).init(params)))
    batch = run.place_batch(np.asarray(x), np.asarray(targets))
    by_name = run.step(*state, *batch, key=key)[3]
    assert_close_tree(run.fetch(run.step(*state, *batch, key)[3]), run.fetch(by_name),
                      jnp.float64, "positional key")
    assert_close_tree(run.fetch(by_name), expected[1], jnp.float64, f"{form} step")


def all_reduce_shapes(form, devices):
    """The result shapes of the all-reduces in the compiled data-parallel LeNet-1989 step."""
    model, objective, params, x, targets = lenet_problem(4, jnp.float32)
    optimizer = optax.sgd(0.1)
    run = parallel.data_parallel(model, objective, optimizer, form=form,
                                 mesh=parallel.batch_mesh(jax.devices()[:devices]))
    batch = run.place_batch(np.asarray(x), np.asarray(targets))
    state = (run.place_state(params), run.place_state(optimizer.init(params)))
    hlo = jax.jit(run.step).lower(*state, *batch).compile().as_text()
    assert len(jax.tree.leaves(params)) == 8
    return [line.split(" = ")[1].split(" all-reduce")[0] for line in hlo.splitlines()
            if " all-reduce(" in line or " all-reduce-start(" in line]


@pytest.mark.parametrize("form", ["shard_map", "pmap"])
def test_the_mapped_forms_reduce_the_gradient_in_one_all_reduce(form):
    """LeNet-1989 has 8 parameter leaves; the step averages them and the energy at once: one
    vector of the 10,960 stored weights (9,760 free ones: H2's kernel keeps the entries its
    connection table masks) and the energy (XLA's all-reduce combiner alone leaves one
    all-reduce of a 9-tuple of arrays). Over one device there is nothing to reduce."""
    assert all_reduce_shapes(form, 2) == ["f32[10961]{0}"]
    assert all_reduce_shapes(form, 1) == []


def test_mean_over_devices_averages_every_leaf_and_keeps_dtypes():
    """Small leaves of two dtypes (raveled together) and one of SMALL_LEAF elements (reduced
    as it is), each example's row on its own device, against NumPy's mean; and the one
    all-reduce: (the 9 small elements in float64, the large leaf)."""
    mesh = parallel.batch_mesh()
    rng = np.random.default_rng(0)
    tree = {"a": rng.normal(size=(2, 3)), "b": rng.normal(size=(2, 5)).astype(np.float32),
            "c": rng.normal(size=(2,)), "d": rng.normal(size=(2, parallel.SMALL_LEAF))}
    mapped = jax.jit(jax.shard_map(
        lambda t: parallel.mean_over_devices(jax.tree.map(lambda v: v[0], t)), mesh=mesh,
        in_specs=jax.sharding.PartitionSpec(parallel.BATCH_AXIS),
        out_specs=jax.sharding.PartitionSpec(), check_vma=False))
    placed = jax.tree.map(jnp.asarray, tree)
    out = mapped(placed)
    assert {k: v.dtype for k, v in out.items()} == {"a": jnp.float64, "b": jnp.float32,
                                                     "c": jnp.float64, "d": jnp.float64}
    for name, value in tree.items():
        np.testing.assert_allclose(np.asarray(out[name]), value.mean(axis=0),
                                   rtol=1e-6 if name == "b" else 1e-15)
    hlo = mapped.lower(placed).compile().as_text()
    reductions = [line.split(" = ")[1].split(" all-reduce")[0] for line in hlo.splitlines()
                  if " all-reduce(" in line or " all-reduce-start(" in line]
    assert reductions == [f"(f64[9]{{0}}, f64[{parallel.SMALL_LEAF}]{{0}})"], reductions
    counts = {"n": jnp.asarray(np.array([[1, 2], [2, 5]], np.int32))}  # means 1.5, 3.5
    with pytest.raises(ValueError, match=r"mean_over_devices: leaves of dtypes \['int32'\]; "
                                         r"expected floating-point leaves only"):
        mapped(counts)


@pytest.mark.parametrize("form", parallel.FORMS)
def test_a_batch_not_divisible_by_the_devices_is_a_clear_error(form):
    model, objective, params, x, targets = mlp_problem(5, jnp.float32)
    optimizer = optax.sgd(0.1)
    run = parallel.data_parallel(model, objective, optimizer, form=form)
    with pytest.raises(ValueError, match="batch of 5 examples .* over 2 devices"):
        run.place_batch(x, targets)
    with pytest.raises(ValueError, match="5"):
        run.step(run.place_state(params), run.place_state(optimizer.init(params)), x, targets)


@pytest.mark.parametrize("form", parallel.FORMS)
def test_targets_of_another_batch_than_x_are_a_clear_error(form):
    """x of 8 examples with targets of 6: place_batch split them without a word, and the
    step's loss then named the shards' shapes ((4, 3) and (3, 3)), not the batch's; under
    "pmap" targets of one device's rows were a raw sharding error."""
    model, objective, params, x, targets = mlp_problem(8, jnp.float32)
    optimizer = optax.sgd(0.1)
    run = parallel.data_parallel(model, objective, optimizer, form=form)
    message = re.escape("x has shape (8, 6) and targets (6, 3); expected one target per "
                        "example")
    with pytest.raises(ValueError, match=message):
        run.place_batch(np.asarray(x), np.asarray(targets[:6]))
    state = (run.place_state(params), run.place_state(optimizer.init(params)))
    if form == "pmap":
        placed_x, placed_targets = run.place_batch(np.asarray(x), np.asarray(targets))
        with pytest.raises(ValueError, match=re.escape(
                "data parallel (pmap): x has shape (2, 4, 6) and targets (1, 4, 3)")):
            run.step(*state, placed_x, placed_targets[:1])
    else:
        with pytest.raises(ValueError, match=message):
            run.step(*state, x, targets[:6])


def test_numpy_counts_infinite_noise_and_process_indices_out_of_range_are_refused():
    """An expected batch of np.int64(0) passed the check (a Python int's) and divided the sum
    by 0; infinite noise made every gradient inf; a count of 2.5 was a raw TypeError;
    process 2 of 2 got the empty slice [8:12) of a batch of 8."""
    model, objective, params, x, targets = mlp_problem(8, jnp.float64)
    value_and_grad = parallel.private_value_and_grad(model, objective, clip_norm=1.0)
    with pytest.raises(ValueError, match="expected_batch must be > 0, got 0"):
        value_and_grad(params, x, targets, weights=jnp.ones(8), expected_batch=np.int64(0))
    with pytest.raises(ValueError, match="noise_multiplier must be finite, got inf"):
        parallel.private_value_and_grad(model, objective, clip_norm=1.0,
                                        noise_multiplier=float("inf"))
    pick = parallel.pick_hardest_misclassified(model, objective, count=2.5)
    with pytest.raises(ValueError, match=r"count must be in \[1, 8\], got 2.5"):
        pick(params, x, targets)
    for index, count in ((2, 2), (-1, 2), (0, 0)):
        with pytest.raises(ValueError, match=re.escape(
                f"distributed: process index {index} of {count} processes")):
            distributed.process_slice(8, index, count)


def test_unknown_form_and_mesh_are_rejected():
    model, objective, *_ = mlp_problem(4, jnp.float32)
    with pytest.raises(ValueError, match="form='pjit'"):
        parallel.data_parallel(model, objective, optax.sgd(0.1), form="pjit")
    mesh = jax.make_mesh((2,), ("data",))
    with pytest.raises(ValueError, match="axis 'batch'"):
        parallel.data_parallel(model, objective, optax.sgd(0.1), mesh=mesh)


def test_scaling_experiment_writes_its_table_and_plot(tmp_path):
    """A reduced `python -m experiments.scaling` on the 2 devices of this process."""
    from experiments import scaling

    assert scaling.device_counts(8, 0) == [1, 2, 4, 8]
    assert scaling.device_counts(6, 0) == [1, 2, 4, 6]
    assert scaling.device_counts(8, 2) == [1, 2]
    assert scaling.main(["--workdir", str(tmp_path), "--no-per-example", "--forms",
                         "shard_map", "--engines", "manual", "--repetitions", "2",
                         "--per-device-batch", "4", "--global-batch", "8"]) == 0
    document = json.loads((tmp_path / "results.json").read_text())
    rows = document["metrics"]["scaling"]
    assert [(r["form"], r["mode"], r["devices"], r["batch"]) for r in rows] == [
        ("single", "weak", 1, 4), ("shard_map", "weak", 1, 4), ("shard_map", "weak", 2, 8),
        ("single", "strong", 1, 8), ("shard_map", "strong", 1, 8),
        ("shard_map", "strong", 2, 8)]
    assert all(r["step_ms"] > 0 and r["compile_s"] >= 0 for r in rows)
    assert document["metrics"]["matmul_precision"].startswith("default")
    assert "float32 matmul precision: default" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "scaling.png").stat().st_size > 10_000


def test_scaling_per_example_part_times_every_form_of_the_gradients():
    """Part 1 of `experiments.scaling` (skipped above for time) at a batch of 3: a row per
    model with every timing and its ratios, LeNet-5 in its default convolutions."""
    from experiments import scaling

    config = scaling.Config(engines=("manual",), per_example_batch=3, repetitions=1,
                            loop_repetitions=1)
    rows = scaling.per_example_rows(config)
    assert [(r["model"], r["engine"], r["batch"]) for r in rows] == [
        ("mlp", "manual", 3), ("lenet5", "manual", 3)]
    for row in rows:
        times = [row[f"{label}_ms"] for label in ("batch_step", "per_example_step",
                                                  "private_step", "vmap", "lax_map",
                                                  "python_loop")]
        assert all(t > 0 for t in times), row
        assert row["loop_over_vmap"] == row["python_loop_ms"] / row["vmap_ms"]
        assert row["per_example_over_batch_step"] == (row["per_example_step_ms"]
                                                      / row["batch_step_ms"])
        assert row["private_ghost_over_batch_step"] == (row["private_ghost_step_ms"]
                                                        / row["batch_step_ms"])


# --- over 4 devices, in a subprocess ---------------------------------------------------------

FOUR_DEVICE_CASES = [  # (problem, engine, form): every model in every form, each engine in
    # every form and for every model (the 2-device tests cross both engines with every form)
    ("mlp", "manual", "shard_map"), ("mlp", "autodiff", "pmap"), ("mlp", "manual", "jit"),
    ("lenet1989", "autodiff", "shard_map"), ("lenet1989", "manual", "pmap"),
    ("lenet1989", "autodiff", "jit"),
    ("lstm", "manual", "shard_map"), ("lstm", "autodiff", "pmap"), ("lstm", "manual", "jit"),
    ("mlp", "autodiff", "explicit"), ("lenet1989", "manual", "explicit"),
    ("lstm", "manual", "explicit"),
]


def four_device_report(batch=16, steps=5):
    """Run in a process with 4 CPU devices: per case, the relative errors of the data-parallel
    gradient and parameters after `steps` against one device, and a sanity difference (one
    device's shard alone against the whole batch)."""
    rows, references = [], {}
    flat = lambda tree: np.asarray(jax.flatten_util.ravel_pytree(tree)[0])  # noqa: E731
    with jax.default_matmul_precision("highest"):
        for name, engine, form in FOUR_DEVICE_CASES:
            model, objective, params, x, targets = PROBLEMS[name](batch, jnp.float32)
            optimizer = optax.sgd(0.05, momentum=0.9)
            if (name, engine) not in references:
                grad, final = single_device_steps(model, objective, optimizer, ENGINES[engine],
                                                  params, x, targets, steps)
                shard = jax.jit(ENGINES[engine](model, objective))(
                    params, x[:batch // 4], targets[:batch // 4])[1]
                references[name, engine] = grad, final, relative_error(flat(shard), flat(grad))
            grad, final, shard_difference = references[name, engine]
            dp_grad, dp_final, placed = data_parallel_steps(
                model, objective, optimizer, ENGINES[engine], form, params, x, targets, steps)
            rows.append({
                "case": f"{name}/{engine}/{form}",
                "devices": len(placed[0].sharding.device_set),
                "dtype": str(flat(dp_final).dtype),
                "grad": max(relative_error(a, b) for a, b in
                            zip(jax.tree.leaves(dp_grad), jax.tree.leaves(grad))),
                "params": max(relative_error(a, b) for a, b in
                              zip(jax.tree.leaves(dp_final), jax.tree.leaves(final))),
                "one_shard_vs_batch": shard_difference,
            })
    try:
        run = parallel.data_parallel(*PROBLEMS["mlp"](4, jnp.float32)[:2], optax.sgd(0.1))
        run.place_batch(np.zeros((10, 6), np.float32), np.zeros((10, 3), np.float32))
        error = None
    except ValueError as raised:
        error = str(raised)
    return {"device_count": jax.device_count(), "rows": rows, "indivisible_error": error}


def test_four_devices_equal_one_device_for_every_form_engine_and_model():
    # unoptimised machine code compiles in half the time and is as exact (no fast-math)
    flags = "--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0"
    environment = {**os.environ, "XLA_FLAGS": flags, "PYTHONPATH": str(ROOT),
                   "JAX_ENABLE_X64": "0"}
    completed = subprocess.run([sys.executable, __file__], env=environment, cwd=ROOT,
                               capture_output=True, text=True, timeout=240)
    assert completed.returncode == 0, completed.stderr[-3000:]
    report = json.loads(completed.stdout.strip().splitlines()[-1])
    assert report["device_count"] == 4
    assert len(report["rows"]) == len(FOUR_DEVICE_CASES)
    for row in report["rows"]:
        assert row["devices"] == 4 and row["dtype"] == "float32", row
        assert row["one_shard_vs_batch"] > 1e-2, row  # the devices' shards really differ
        assert row["grad"] <= FLOAT32, row
        assert row["params"] <= FLOAT32, row
    assert "batch of 10 examples" in report["indivisible_error"]
    assert "over 4 devices" in report["indivisible_error"]


if __name__ == "__main__":
    print(json.dumps(four_device_report()))


def test_bad_arguments_are_refused_by_name(mlp_case):
    model, objective, params, x, targets, *_ = mlp_case
    with pytest.raises(ValueError, match="private_value_and_grad: noise_multiplier must be >= 0, "
                                         "got -1"):
        parallel.private_value_and_grad(model, objective, clip_norm=1.0, noise_multiplier=-1.0)
    for clip_norm in (0.0, -1.0, float("nan")):  # -1 stepped against the gradient
        with pytest.raises(ValueError, match=rf"private_value_and_grad: clip_norm must be > 0, "
                                             rf"got {clip_norm}"):
            parallel.private_value_and_grad(model, objective, clip_norm=clip_norm)
    infinite = parallel.private_value_and_grad(model, objective, clip_norm=float("inf"))
    assert_close_tree(  # no clipping without noise: the plain gradient
        infinite(params, x, targets)[1], engines.manual(model, objective)(params, x, targets)[1],
        "float64", "clip_norm=inf")
    with pytest.raises(ValueError, match=r"private_value_and_grad: clip_norm must be finite with "
                                         r"noise_multiplier 1.0 > 0 \(the noise's scale is sigma "
                                         r"C\), got inf"):  # every gradient's noise was inf
        parallel.private_value_and_grad(model, objective, clip_norm=float("inf"),
                                        noise_multiplier=1.0)
    with pytest.raises(ValueError, match="pick_hardest_misclassified: by='margin'; choose "
                                         "'grad_norm' or 'loss'"):
        parallel.pick_hardest_misclassified(model, objective, count=1, by="margin")
    for count in (0, x.shape[0] + 1):
        pick = parallel.pick_hardest_misclassified(model, objective, count=count)
        with pytest.raises(ValueError, match=rf"count must be in \[1, {x.shape[0]}\], got "
                                             rf"{count}"):
            pick(params, x, targets)
    run = parallel.data_parallel(model, objective, optax.sgd(0.1))
    with pytest.raises(TypeError, match="data parallel: expected 3 arguments and an optional "
                                        "key, got 2"):
        run.value_and_grad(run.place_state(params), x)


def test_private_gradient_draws_independent_noise_for_every_leaf():
    """DP-SGD noise is a draw of its own for each leaf: in a 16 -> 16 -> 16 MLP the two 16 x 16
    weight matrices have the same shape, and their noise (noisy - noiseless gradient)
    m / (sigma C), each N(0, 1), must be uncorrelated. With key 2 the correlation measures
    -0.030 (bound 0.2; standard error 1/sqrt(256) = 0.0625) and the standard deviations 1.04
    and 1.00 (bound 1 +- 0.25). Fails if the leaves share a key: same-shaped leaves then get
    the same draw (correlation 1)."""
    model = nets.build_mlp(16, 16, hidden_units=16, hidden_layers=1)
    params = cast(model.init(jax.random.key(0), (-1, 16))[1], jnp.float64)
    batch, clip, sigma = 6, 0.5, 1.0
    x, targets = random_batch(jax.random.key(1), batch, 16, 16, jnp.float64)
    objective = nets.lecture_objective(0.0)
    plain = parallel.private_value_and_grad(model, objective, clip_norm=clip)(
        params, x, targets)[1]
    noisy = parallel.private_value_and_grad(model, objective, clip_norm=clip,
                                            noise_multiplier=sigma)(
        params, x, targets, jax.random.key(2))[1]
    noise = [np.ravel(np.asarray(a - b)) * batch / (sigma * clip)
             for a, b in zip(jax.tree.leaves(noisy), jax.tree.leaves(plain))]
    weights = [n for n in noise if n.size == 256]
    assert len(weights) == 2
    assert all(abs(n.std() - 1) < 0.25 for n in weights)
    assert abs(np.corrcoef(*weights)[0, 1]) < 0.2
