"""Forward-mode tangent passes and the Gauss-Newton product G v = J^T H J v, by hand, against
jax: `jax.jvp` of each layer's apply, the loss's `jax.hessian`, and jvp-then-vjp of the forward
pass for whole nets; a linear model's G worked out by hand; the experiment's smoke run."""
import json

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest

import nets
from experiments import gradcheck as experiment_gradcheck
from experiments import largest_eigenvalue
from nets import gradcheck, models
from nets.conv import IMPLEMENTATIONS
from nets.engines import gauss_newton_product
from tests.helpers import F64, assert_close_tree, assert_tangent_is_jvp, random_like, tolerance


@pytest.mark.parametrize("activation", sorted(nets.ACTIVATIONS))
def test_every_activation_tangent_is_jax_jvp(activation, dtype):
    assert_tangent_is_jvp(nets.ACTIVATIONS[activation](), (4, 7), dtype, scale=2.0)


@pytest.mark.parametrize("layer, input_shape", [
    (nets.Dense(5), (3, 4)),
    (models.ScaledTanh(), (3, 4)),
    (nets.EuclideanRBF(np.random.default_rng(0).normal(size=(6, 4))), (3, 4)),
    (nets.Flatten(), (2, 3, 3, 2)),
    (nets.AvgPool(2), (2, 4, 6, 3)),
    (nets.AvgPool((2, 3), (1, 2)), (2, 5, 7, 2)),
    (nets.MaxPool(3, 2), (2, 7, 7, 3)),
    (nets.MaxPool((2, 3), (2, 1)), (2, 6, 7, 2)),
    (nets.Subsampling(2), (2, 4, 6, 3)),
    (nets.residual(nets.serial(nets.Dense(4), nets.Tanh())), (3, 4)),
    (nets.parallel(nets.Dense(2), nets.serial(nets.Dense(3), nets.Sigmoid())), (3, 4)),
    (nets.remat(nets.serial(nets.Dense(4), nets.Gelu(), nets.Dense(2))), (3, 4)),
], ids=lambda value: getattr(value, "name", None) or str(value))
def test_layer_tangent_is_jax_jvp(layer, input_shape, dtype):
    assert_tangent_is_jvp(layer, input_shape, dtype)


@pytest.mark.parametrize("layer, input_shape", [
    (nets.LayerNorm(5), (3, 5)),
    (nets.LayerNorm(3), (2, 4, 4, 3)),
    (nets.BatchNorm(5), (6, 5)),
    (nets.BatchNorm(3), (2, 4, 4, 3)),
], ids=["layer_norm_rows", "layer_norm_maps", "batch_norm_rows", "batch_norm_maps"])
def test_normalisation_tangent_is_jax_jvp(layer, input_shape, dtype):
    """The row's or the batch's statistics move with dx: the Jacobian of xhat, symmetric."""
    assert_tangent_is_jvp(layer, input_shape, dtype, scale=2.0)


def test_batch_norm_with_fixed_statistics_moves_with_them(dtype):
    """With fixed "mean" and "var", directions of those move the output too."""
    rng = np.random.default_rng(5)
    params = {"g": rng.normal(size=4), "b": rng.normal(size=4), "mean": rng.normal(size=4),
              "var": rng.uniform(0.5, 2.0, size=4)}
    assert_tangent_is_jvp(nets.BatchNorm(4), (3, 4), dtype, params=params)


@pytest.mark.parametrize("layer, input_shape", [
    (nets.SelfAttention(8, 2), (2, 5, 8)),
    (nets.SelfAttention(6, 3, causal=False), (2, 4, 6)),
    (nets.PositionalEmbedding(6, 4), (2, 5, 4)),
    (nets.TimeDistributed(nets.Dense(3)), (2, 4, 5)),
], ids=["attention_causal", "attention_full", "positions", "time_distributed"])
def test_sequence_layer_tangent_is_jax_jvp(layer, input_shape, dtype):
    assert_tangent_is_jvp(layer, input_shape, dtype)


def test_embedding_tangent_moves_the_looked_up_rows(dtype):
    """Token ids have no tangent: dy = dw[ids], against jax.jvp in w alone."""
    layer = nets.Embedding(5, 3)
    params = gradcheck.astype(layer.init(jax.random.key(0), (-1, 4))[1], dtype)
    ids = jnp.asarray([[0, 4, 2, 2], [1, 3, 0, 4]])
    dparams = random_like(jax.random.key(1), params, dtype)
    y, dy = layer.tangent(params, ids, dparams, None)
    y_ref, dy_ref = jax.jvp(lambda p: layer.apply(p, ids), (params,), (dparams,))
    assert jnp.array_equal(y, y_ref) and jnp.array_equal(dy, dy_ref)
    assert jnp.array_equal(dy, dparams["w"][ids])


@pytest.mark.parametrize("layer", [nets.LocalResponseNorm(3, k=1.0, alpha=0.2),
                                   models.channel_groups(nets.LocalResponseNorm(3, alpha=0.3), 2),
                                   models.channel_groups(nets.Dense(2), 2)],
                         ids=["lrn", "lrn_in_two_groups", "dense_in_two_groups"])
def test_local_response_norm_and_channel_groups_tangents_are_jax_jvp(layer, dtype):
    """alpha far above the paper's 1e-4, so that the window's term is not lost in rounding."""
    shape = (3, 6) if "dense" in layer.name.lower() else (2, 3, 3, 6)
    assert_tangent_is_jvp(layer, shape, dtype, scale=2.0)


def assert_alexnet_product_is_its_reference(product, reference):
    """product(model, objective) against reference(model, objective) for AlexNet: both
    towers (grouped convolutions, LRN in two groups, overlapping max pooling) and dropout in
    the fully connected layers, at 67 x 67 and 5 classes, float64, one key."""
    model = models.alexnet(num_classes=5)
    objective = nets.Objective(nets.softmax_cross_entropy(), 0.01)
    params = gradcheck.astype(model.init(jax.random.key(0), (-1, 67, 67, 3))[1], jnp.float64)
    x = jax.random.normal(jax.random.key(1), (2, 67, 67, 3), jnp.float64)
    targets = jax.nn.one_hot(jnp.asarray([1, 3]), 5, dtype=jnp.float64)
    v = random_like(jax.random.key(2), params, jnp.float64)
    key = jax.random.key(3)
    with jax.default_matmul_precision("highest"):
        got = jax.jit(product(model, objective))(params, x, targets, v, key)
        want = jax.jit(reference(model, objective))(params, x, targets, v, key)
    assert_close_tree(got, want, jnp.float64, "alexnet")


def test_alexnet_gauss_newton_product_is_jax_with_its_dropout_masks():
    assert_alexnet_product_is_its_reference(gauss_newton_product,
                                            gradcheck.gauss_newton_product_reference)


def test_dropout_tangent_uses_the_forwards_mask(dtype):
    """With a key, dy = dx m / p for the mask the forward draws with that key (jax.jvp of
    apply with the key); without one, dy = dx; a key for a net without dropout is refused."""
    layer = nets.Dropout(0.5)
    x = jax.random.normal(jax.random.key(0), (4, 6), dtype)
    dx = jax.random.normal(jax.random.key(1), x.shape, dtype)
    key = jax.random.key(2)
    (y, dy), (y_ref, dy_ref) = (layer.tangent((), x, (), dx, key=key),
                                jax.jvp(lambda x: layer.apply((), x, key), (x,), (dx,)))
    assert jnp.array_equal(y, y_ref) and jnp.array_equal(dy, dy_ref)
    assert 0 < int(jnp.sum(dy == 0)) < dy.size
    assert jnp.array_equal(layer.tangent((), x, (), dx)[1], dx)
    with pytest.raises(ValueError, match="a key was given, but no layer in it draws"):
        nets.layers.tangent_with_key(nets.Dense(2), {"w": jnp.ones((6, 2)), "b": jnp.ones(2)}, x,
                              {"w": jnp.ones((6, 2)), "b": jnp.ones(2)}, None, key)


def dropout_case(name, dtype):
    """(model, objective, params, x, targets) of a net with dropout: "mlp_dropout" (Dropout
    and dropout_after), "transformer_lm_dropout" or "rnn_dropout"."""
    if name == "mlp_dropout":
        model = nets.serial(nets.Dense(8), nets.Tanh(), nets.Dropout(0.5), nets.Dense(8),
                            nets.Relu(), nets.dropout_after(nets.Dense(3), 0.3))
        objective = nets.Objective(nets.softmax_cross_entropy(), 0.1)
        x = jax.random.normal(jax.random.key(0), (5, 4), dtype)
        targets = jax.nn.one_hot(jnp.arange(5) % 3, 3, dtype=dtype)
        params = gradcheck.astype(model.init(jax.random.key(1), (-1, 4))[1], dtype)
    elif name == "rnn_dropout":
        model = nets.sequence_model([nets.lstm(5), nets.elman(4)], 7, dropout=0.3)
        objective = nets.Objective(nets.sequence_cross_entropy(), 0.0)
        x = jax.random.normal(jax.random.key(0), (3, 6, 3), dtype)
        targets = jax.random.randint(jax.random.key(2), (3, 6), 0, 7)
        params = gradcheck.astype(model.init(jax.random.key(1), (-1, 6, 3))[1], dtype)
    else:
        model = nets.transformer_lm(7, context=6, features=8, heads=2, blocks=1, dropout=0.3)
        objective = nets.Objective(nets.sequence_cross_entropy(), 0.0)
        ids = jax.random.randint(jax.random.key(0), (3, 7), 0, 7)
        x, targets = ids[:, :-1], ids[:, 1:]
        params = gradcheck.astype(model.init(jax.random.key(1), (-1, 6))[1], dtype)
    return model, objective, params, x, targets


def assert_product_holds_the_masks_of_a_key(product, reference, name, dtype):
    """product(model, objective) with one key against reference(model, objective) with the
    same key at `dropout_case(name)`, and another key giving another product."""
    model, objective, params, x, targets = dropout_case(name, dtype)
    v = random_like(jax.random.key(4), params, dtype)
    key = jax.random.key(5)
    with jax.default_matmul_precision("highest"):
        manual = jax.jit(product(model, objective))
        got = manual(params, x, targets, v, key)
        want = jax.jit(reference(model, objective))(params, x, targets, v, key)
        other = manual(params, x, targets, v, jax.random.key(6))
    assert_close_tree(got, want, dtype, name)
    assert gradcheck.relative_error(jax.flatten_util.ravel_pytree(got)[0],
                                    jax.flatten_util.ravel_pytree(other)[0]) > 1e-3


@pytest.mark.parametrize("name", ["mlp_dropout", "transformer_lm_dropout", "rnn_dropout"])
def test_gauss_newton_product_holds_the_dropout_masks_of_a_key(name, dtype):
    """G of E with the masks of one key held fixed, against jax's product through apply with
    that key; and another key gives another G v."""
    assert_product_holds_the_masks_of_a_key(
        gauss_newton_product, gradcheck.gauss_newton_product_reference, name, dtype)


def test_max_pool_tangent_averages_tied_maxima_as_jax_jvp_does(dtype):
    """ReLU's zeros tie in most windows; a window's dy is then the mean of its tied dx."""
    assert_tangent_is_jvp(nets.serial(nets.Relu(), nets.MaxPool(2)), (2, 4, 4, 3), dtype)
    layer = nets.MaxPool(2)
    x = jnp.zeros((1, 2, 2, 1), dtype).at[0, 0, 0, 0].set(-1.0)  # three zeros tie
    dx = jnp.arange(1.0, 5.0, dtype=dtype).reshape(1, 2, 2, 1)
    _, dy = layer.tangent((), x, (), dx)
    assert float(dy[0, 0, 0, 0]) == pytest.approx((2 + 3 + 4) / 3, rel=1e-6)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("settings, input_shape", [
    (dict(kernel_size=3, stride=1, padding="SAME"), (2, 6, 7, 3)),
    (dict(kernel_size=5, stride=2, padding=((2, 1), (2, 1)), pad_value=-1.0,
          unshared_bias=True), (2, 9, 9, 1)),
    (dict(kernel_size=(2, 3), stride=(2, 1), padding="VALID",
          connection_table=np.array([[1, 0, 1, 1], [0, 1, 1, 0], [1, 1, 0, 1]], bool)),
     (2, 6, 7, 3)),
    (dict(kernel_size=3, stride=2, padding="VALID", feature_group_count=2), (2, 7, 7, 4)),
    (dict(kernel_size=5, padding="VALID"), (2, 5, 5, 3)),  # one window: the Dense form
], ids=["same", "minus_one_border_unshared", "table", "groups", "whole_input"])
def test_conv_tangent_is_jax_jvp(implementation, settings, input_shape, dtype):
    """Every implementation, stride, border (a constant -1 border does not move with dx),
    unshared bias, connection table and group count."""
    layer = nets.Conv2D(4, implementation=implementation, name="conv", **settings)
    assert_tangent_is_jvp(layer, input_shape, dtype)


def test_tied_parameter_moves_in_both_places(dtype):
    """With tie, a direction of the source moves the shared value where both layers use it:
    against jax.jvp of the tied model's apply."""
    model = nets.tie(nets.serial(nets.Dense(3, name="encode"), nets.Tanh(),
                                 nets.Dense(5, name="decode")),
                     ("encode", "w"), ("decode", "w"), transpose=True)
    assert_tangent_is_jvp(model, (4, 5), dtype)


MSE = nets.Objective(nets.mean_squared_error(), 0.1)
CASES = {
    "mlp_lecture_l2": (lambda: nets.build_mlp(6, 4, hidden_units=5),
                       nets.lecture_objective(0.5), (6,), "zero_one"),
    "mlp_probabilities": (lambda: nets.build_mlp(6, 4, hidden_units=5,
                                                 output_activation="sigmoid"),
                          nets.lecture_objective(0.0, from_logits=False), (6,), "zero_one"),
    "mlp_softmax_mass": (lambda: nets.build_mlp(6, 4, hidden_layers=2, hidden_units=5,
                                                activation="relu"),
                         nets.Objective(nets.softmax_cross_entropy(), 0.0), (6,), "mass"),
    "lenet1989_mse": (models.lenet1989, MSE, (16, 16, 1), "plus_minus_one"),
    # scores -|x - c|^2 of order 1 and j = 1, so that both the classes and the "rubbish"
    # class share q (LeNet-5's 84-dimensional penalties, ~150 apart at random, make q one-hot:
    # H then cancels to a 1e-9 fraction of its terms, and both sides lose that to rounding)
    "rbf_map": (lambda: nets.serial(nets.Dense(4), nets.Tanh(), nets.EuclideanRBF(
        np.random.default_rng(1).uniform(-0.5, 0.5, (5, 4)))),
                nets.Objective(nets.lecun1998_map(1.0), 0.1), (6,), "zero_one"),
    "lenet5_softmax": (models.lenet5, nets.Objective(nets.softmax_cross_entropy(), 0.01),
                       (32, 32, 1), "zero_one"),
    **{case.name: (lambda case=case: case.build()[0], case.build()[1], case.input_shape,
                   "zero_one") for case in experiment_gradcheck.CASES
       if case.name in ("residual_mlp_layernorm", "conv_batchnorm")},
    # token ids of 7 in, next-token logits out: embeddings, positions, causal attention,
    # LayerNorm, a GELU MLP at every step; untied and tied
    **{name: (lambda tie=tie: nets.transformer_lm(7, context=6, features=8, heads=2, blocks=1,
                                                  activation="gelu", tie_embeddings=tie),
              nets.Objective(nets.sequence_cross_entropy(), 0.01), (6,), "sequence")
       for name, tie in (("transformer_lm", False), ("transformer_lm_tied", True))},
    # recurrent nets (tangent scans, tests/test_recurrent_gauss_newton.py): 6 steps of 3
    # features, classes at every step or one answer at the last
    "rnn_lstm_gru_per_step": (lambda: nets.sequence_model([nets.lstm(5), nets.gru(4)], 7),
                              nets.Objective(nets.sequence_cross_entropy(), 0.01), (6, 3),
                              "per_step"),
    "rnn_elman_last_step_softmax": (lambda: nets.sequence_model([nets.elman(5)], 4,
                                                                last_step=True),
                                    nets.Objective(nets.softmax_cross_entropy(), 0.1), (6, 3),
                                    "zero_one"),
    "rnn_bidirectional_per_step": (lambda: nets.sequence_model(
        [nets.gru_reset_after(4), nets.lstm(3, peepholes=True)], 5, bidirectional=True),
        nets.Objective(nets.sequence_cross_entropy(), 0.0), (6, 3), "per_step"),
    "rnn_bidirectional_last_step_mse": (lambda: nets.sequence_model(
        [nets.gru(4)], 3, bidirectional=True, last_step=True), MSE, (6, 3), "zero_one"),
    "rnn_lstm_truncated": (lambda: nets.sequence_model([nets.lstm(5)], 7, truncation=2),
                           nets.Objective(nets.sequence_cross_entropy(), 0.0), (6, 3),
                           "per_step"),
}


def case_point(name, dtype, batch=3):
    """(model, objective, params, x, targets, v) of CASES[name]: the model's initial params
    moved (`gradcheck.moved_parameters`: at init a LayerNorm's gain is 1, where a backward
    dividing by it passes), a batch of inputs and targets of the case's kind, a random v."""
    build, objective, input_shape, target_kind = CASES[name]
    model = build()
    keys = jax.random.split(jax.random.key(len(name)), 5)
    params = gradcheck.moved_parameters(keys[4], model.init(keys[0], (-1, *input_shape))[1])
    params = gradcheck.astype(params, dtype)
    if target_kind == "sequence":
        ids = jax.random.randint(keys[1], (batch, input_shape[0] + 1), 0, 7)
        return model, objective, params, ids[:, :-1], ids[:, 1:], random_like(keys[3], params,
                                                                              dtype)
    x = jax.random.normal(keys[1], (batch, *input_shape), dtype)
    outputs = model.apply(params, x).shape[-1]
    if target_kind == "per_step":  # a class at every step of the sequence
        targets = jax.random.randint(keys[2], (batch, input_shape[0]), 0, outputs)
        return model, objective, params, x, targets, random_like(keys[3], params, dtype)
    targets = jax.nn.one_hot(jax.random.randint(keys[2], (batch,), 0, outputs), outputs,
                             dtype=dtype)
    if target_kind == "plus_minus_one":
        targets = 2 * targets - 1
    elif target_kind == "mass":  # rows of masses 0.7/0.3, 2 and 0: the Hessian scales with it
        targets = jnp.asarray([[0.7, 0.3, 0, 0], [0, 2, 0, 0], [0, 0, 0, 0]], dtype)
    return model, objective, params, x, targets, random_like(keys[3], params, dtype)


def assert_product_is_its_reference(product, reference, name, dtype):
    """product(model, objective) against reference(model, objective) at CASES[name]'s point:
    the params' structure and dtypes, and within dtype's tolerance."""
    model, objective, params, x, targets, v = case_point(name, dtype)
    with jax.default_matmul_precision("highest"):
        got = jax.jit(product(model, objective))(params, x, targets, v)
        want = jax.jit(reference(model, objective))(params, x, targets, v)
    assert jax.tree.structure(got) == jax.tree.structure(params)
    assert all(g.dtype == p.dtype for g, p in zip(jax.tree.leaves(got), jax.tree.leaves(params)))
    assert_close_tree(got, want, dtype, name)


@pytest.mark.parametrize("name", sorted(CASES))
def test_gauss_newton_product_is_jax_jvp_hessian_vjp(name, dtype):
    assert_product_is_its_reference(gauss_newton_product,
                                    gradcheck.gauss_newton_product_reference, name, dtype)


def test_linear_model_gauss_newton_worked_out_by_hand():
    """y = x w + b under E = (1/2m) sum (y - t)^2 + (lambda/2m) |w|^2: G v for v = (dw, db) is
    dw: x^T (x dw + db)/m + (lambda/m) dw, db: sum_n (x dw + db)_n / m, in NumPy."""
    rng = np.random.default_rng(3)
    x, t = rng.normal(size=(5, 3)), rng.normal(size=(5, 2))
    params = {"w": rng.normal(size=(3, 2)), "b": rng.normal(size=2)}
    v = {"w": rng.normal(size=(3, 2)), "b": rng.normal(size=2)}
    objective = nets.Objective(nets.mean_squared_error(), 0.3)
    got = gauss_newton_product(nets.Dense(2), objective)(
        jax.tree.map(jnp.asarray, params), jnp.asarray(x), jnp.asarray(t),
        jax.tree.map(jnp.asarray, v))
    moved = x @ v["w"] + v["b"]
    np.testing.assert_allclose(got["w"], x.T @ moved / 5 + 0.3 / 5 * v["w"], rtol=1e-13)
    np.testing.assert_allclose(got["b"], moved.sum(axis=0) / 5, rtol=1e-13)


def test_gauss_newton_columns_are_the_exact_matrix_and_its_diagonal_bounds_lambda_max():
    """G e_i for every coordinate of a small conv net: its diagonal is jax's exact Gauss-Newton
    diagonal (`gradcheck.gauss_newton_diagonal`), the matrix is symmetric positive
    semi-definite, and power iteration with the hand-written product reaches its largest
    eigenvalue (numpy.linalg.eigvalsh), which is at least every diagonal entry."""
    model = nets.serial(nets.Conv2D(2, 3, padding="SAME", pad_value=-1.0), nets.Tanh(),
                        nets.AvgPool(2), nets.Flatten(), nets.Dense(3), nets.Tanh())
    objective = nets.Objective(nets.mean_squared_error(), 0.2)
    params = gradcheck.astype(model.init(jax.random.key(1), (-1, 4, 4, 1))[1], jnp.float64)
    x = jax.random.normal(jax.random.key(2), (4, 4, 4, 1), jnp.float64)
    targets = jnp.where(jax.random.bernoulli(jax.random.key(3), 0.5, (4, 3)), 1.0, -1.0)
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    product = gauss_newton_product(model, objective)
    columns = jax.jit(jax.vmap(lambda e: jax.flatten_util.ravel_pytree(
        product(params, x, targets, unravel(e)))[0]))(jnp.eye(flat.size))
    matrix = np.asarray(columns).T
    exact_diagonal = jax.flatten_util.ravel_pytree(
        gradcheck.gauss_newton_diagonal(model, objective, params, x, targets))[0]
    assert gradcheck.relative_error(np.diag(matrix), exact_diagonal) <= F64
    assert np.abs(matrix - matrix.T).max() <= F64 * np.abs(matrix).max()
    eigenvalues = np.linalg.eigvalsh((matrix + matrix.T) / 2)
    assert eigenvalues.min() >= -F64 * eigenvalues.max()
    estimates, _ = largest_eigenvalue.power_iteration(product, 300)(
        params, x, targets, unravel(jnp.ones_like(flat)))
    assert float(estimates[-1]) == pytest.approx(eigenvalues.max(), rel=1e-8)
    assert eigenvalues.max() >= np.diag(matrix).max()


def test_sequence_loss_hessian_vector_is_jax_hessian_times_u():
    """Per step (diag(p) - p p^T) u / (m T); under jit, where a class outside [0, classes)
    cannot be refused, such a step adds nothing (as to E)."""
    loss = nets.sequence_cross_entropy()
    z = jax.random.normal(jax.random.key(6), (2, 3, 4))
    u = jax.random.normal(jax.random.key(7), z.shape)

    @jax.jit
    def both(z, targets, u):
        hessian = jax.hessian(lambda o: loss.value(o, targets))(z)
        return loss.hessian_vector(z, targets, u), jnp.einsum("abcdef,def->abc", hessian, u)

    for targets in (jnp.asarray([[0, 3, 1], [2, 2, 0]]), jnp.asarray([[0, 3, 9], [2, -1, 0]])):
        got, expected = both(z, targets, u)
        assert gradcheck.relative_error(got, expected) <= F64


@pytest.mark.parametrize("name", ["softmax", "map", "mse", "sigmoid_logits",
                                  "sigmoid_probabilities"])
def test_loss_hessian_vector_is_jax_hessian_times_u(name):
    loss = {"softmax": nets.softmax_cross_entropy(), "map": nets.lecun1998_map(2.0),
            "mse": nets.mean_squared_error(), "sigmoid_logits": nets.sigmoid_cross_entropy(),
            "sigmoid_probabilities": nets.sigmoid_cross_entropy(from_logits=False)}[name]
    keys = jax.random.split(jax.random.key(4), 2)
    outputs = jax.random.normal(keys[0], (3, 4))
    if name == "sigmoid_probabilities":
        outputs = jax.nn.sigmoid(outputs)
    targets = jnp.asarray([[0.7, 0.3, 0, 0], [0, 0, 2, 0], [1, 0, 0, 0]])
    if name.startswith("sigmoid"):  # a probability for each output: at most 1
        targets = targets.at[1, 2].set(1.0).at[2, 3].set(0.5)
    u = jax.random.normal(keys[1], outputs.shape)
    hessian = jax.hessian(lambda o: loss.value(o, targets))(outputs)
    expected = jnp.einsum("ijkl,kl->ij", hessian, u)
    assert gradcheck.relative_error(loss.hessian_vector(outputs, targets, u), expected) <= F64


def test_refusals_name_the_layer_the_loss_and_the_shape():
    plain = nets.Layer("plain", lambda key, shape: (shape, ()), lambda p, x: (x, None),
                       lambda p, r, dy: ((), dy))
    with pytest.raises(ValueError, match="layer 'plain' has no tangent"):
        gauss_newton_product(nets.serial(nets.Dense(2), plain), nets.Objective(
            nets.mean_squared_error()))
    squared = nets.losses.Loss("plain", lambda o, t: jnp.sum((o - t) ** 2),
                               lambda o, t: 2 * (o - t))
    with pytest.raises(ValueError, match="plain: this loss defines no Hessian-vector product"):
        gauss_newton_product(nets.Dense(2), nets.Objective(squared))
    with pytest.raises(ValueError, match=r"hessian_vector's u has shape \(2, 3\), expected the "
                                         r"outputs' \(2, 4\)"):
        nets.softmax_cross_entropy().hessian_vector(jnp.zeros((2, 4)), jnp.zeros((2, 4)),
                                                    jnp.zeros((2, 3)))


@pytest.mark.slow
def test_experiment_writes_the_estimates_agreeing_and_the_runs(tmp_path):
    metrics = largest_eigenvalue.main([
        "--workdir", str(tmp_path), "--model", "mlp", "--examples", "40", "--iterations", "8",
        "--negative-iterations", "8", "--lanczos-iterations", "8",
        "--steps", "4", "--track-every", "2", "--track-iterations", "2", "--factors", "1,50"])
    document = json.loads((tmp_path / "results.json").read_text())
    estimates = document["power_iterations"]
    assert set(estimates) == {"manual_gauss_newton", "jax_gauss_newton", "manual_hessian",
                              "jax_hessian", "manual_hessian_most_negative",
                              "lanczos_gauss_newton_largest", "lanczos_gauss_newton_smallest",
                              "lanczos_hessian_largest", "lanczos_hessian_smallest"}
    assert all(len(values) == 8 for values in estimates.values())
    # after j + 1 products, Lanczos' largest Ritz value bounds the power iteration's Rayleigh
    # quotient (a vector of the same Krylov subspace) from above, its smallest the shifted
    # iteration's from below; float32 rounding scales with the spectrum's extent
    scale = max(abs(value) for values in estimates.values() for value in values)
    slack = tolerance(jnp.float32) * scale
    for name in ("gauss_newton", "hessian"):
        assert all(lanczos >= power - slack for lanczos, power in zip(
            estimates[f"lanczos_{name}_largest"], estimates[f"manual_{name}"]))
    assert all(lanczos <= power + slack for lanczos, power in zip(
        estimates["lanczos_hessian_smallest"], estimates["manual_hessian_most_negative"]))
    assert metrics["lanczos_hessian_smallest"] < 0
    assert metrics["lanczos_gauss_newton_smallest"] >= -slack  # G is positive semi-definite
    # float32 data: the hand-written and jax's products, iterated from one start
    assert metrics["manual_vs_jax_max_relative"] <= tolerance(jnp.float32)
    assert metrics["hessian_manual_vs_jax_max_relative"] <= tolerance(jnp.float32)
    assert metrics["lambda_min_hessian"] < metrics["lambda_max_hessian"]
    assert metrics["lambda_max_gauss_newton"] == estimates["manual_gauss_newton"][-1] > 0
    runs = document["runs"]
    assert [run["factor"] for run in runs] == [1.0, 50.0]
    assert all(len(run["losses"]) == 5 and [s for s, _ in run["sharpness"]] == [0, 2]
               for run in runs)
    assert runs[0]["eta"] == pytest.approx(1 / metrics["lambda_max_gauss_newton"])
    assert runs[0]["losses"][-1] < runs[0]["losses"][0]  # 1 / lambda_max descends
    assert (tmp_path / "largest_eigenvalue.png").stat().st_size > 10_000
    assert "manual_gauss_newton" in (tmp_path / "results.md").read_text()
