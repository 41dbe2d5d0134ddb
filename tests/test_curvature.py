"""LeCun's Gauss-Newton diagonal, backpropagated by hand, against jax's exact matrices."""
import json

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import nets
from nets import engines, gradcheck, layers, losses, models
from nets.gradcheck import astype, relative_error
from tests.helpers import F64, assert_close_tree, random_batch
from training import optim


def problem(model, objective, features, classes, batch=6, targets="one_hot"):
    _, params = model.init(jax.random.key(0), (-1, features))
    params = astype(params, jnp.float64)
    x, y = random_batch(jax.random.key(1), batch, features, classes, jnp.float64)
    if targets == "plus_minus_one":
        y = 2 * y - 1
    return params, x, y


def backpropagated_and_exact(model, objective, params, x, y):
    """(engines.curvature_diagonal's diagonal, gradcheck.gauss_newton_diagonal's exact one),
    each compiled as one program (op by op, each operation compiles apart)."""
    return (jax.jit(engines.curvature_diagonal(model, objective))(params, x, y),
            gradcheck.gauss_newton_diagonal(model, objective, params, x, y))


@pytest.mark.parametrize("objective", [
    losses.Objective(losses.mean_squared_error(), 0.3),
    losses.lecture_objective(0.7),
])
def test_one_hidden_layer_one_output_is_exact(objective):
    """Every unit reaches the single output by one path: no cross terms to drop."""
    model = nets.build_mlp(5, 1, hidden_units=4, activation="tanh")
    params, x, y = problem(model, objective, 5, 1, batch=7)
    y = (y > 0).astype(y.dtype) if objective.loss.name.startswith("sigmoid") else y
    backpropagated, exact = backpropagated_and_exact(model, objective, params, x, y)
    assert_close_tree(backpropagated, exact, jnp.float64, "one path")


@pytest.mark.parametrize("loss", [losses.softmax_cross_entropy(), losses.lecun1998_map(1.0)])
def test_a_loss_that_couples_the_outputs_is_exact_only_at_the_output_layer(loss):
    """Softmax cross-entropy and the MAP criterion couple one example's outputs: H at the
    outputs is not diagonal. The reference (the whole H, by forward-over-reverse products) is
    diag(J^T H J) written out with jax.hessian and jax.jacobian here; LeCun's rule, which
    keeps H's diagonal, is exact for the output layer (one path to each output) and not for
    the hidden one (every hidden unit reaches every output)."""
    model = nets.build_mlp(4, 3, hidden_units=5, activation="tanh")
    objective = losses.Objective(loss, 0.2)
    params, x, y = problem(model, objective, 4, 3, batch=5)
    backpropagated, reference = backpropagated_and_exact(model, objective, params, x, y)

    @jax.jit  # one program
    def write_out(params, x, y):
        flat, unravel = jax.flatten_util.ravel_pytree(params)
        outputs = model.apply(params, x)
        jacobian = jax.jacobian(lambda p: model.apply(unravel(p), x))(flat).reshape(15, -1)
        hessian = jax.hessian(lambda o: loss.value(o.reshape(5, 3), y))(
            outputs.reshape(-1)).reshape(15, 15)
        penalty = jax.flatten_util.ravel_pytree(
            losses.l2_penalty_grad(jax.tree.map(jnp.ones_like, params), 0.2, 5))[0]
        return unravel(jnp.einsum("op,oq,qp->p", jacobian, hessian, jacobian) + penalty)

    assert_close_tree(reference, write_out(params, x, y), jnp.float64, "J^T H J")
    assert_close_tree(backpropagated[2], reference[2], jnp.float64, "output layer")  # "output"
    assert relative_error(backpropagated[0]["w"], reference[0]["w"]) > 0.1


def test_curvature_on_subset_is_the_exact_diagonal_on_the_first_examples():
    """The closure stochastic_passes takes: the first `examples` only (all 9 when asked for
    9); on a one-path net against jax's exact Gauss-Newton diagonal of those examples."""
    from training import procedures

    model = nets.build_mlp(5, 1, hidden_units=4, activation="tanh")
    objective = losses.Objective(losses.mean_squared_error(), 0.3)
    params, x, y = problem(model, objective, 5, 1, batch=9)
    first_four = jax.jit(procedures.curvature_on_subset(model, objective, x, y, 4))(params)
    assert_close_tree(first_four, gradcheck.gauss_newton_diagonal(
        model, objective, params, x[:4], y[:4]), jnp.float64, "first 4 of 9")
    assert relative_error(first_four[0]["w"], gradcheck.gauss_newton_diagonal(
        model, objective, params, x, y)[0]["w"]) > 1e-3
    every = jax.jit(procedures.curvature_on_subset(model, objective, x, y, 9))(params)
    assert_close_tree(every, gradcheck.gauss_newton_diagonal(model, objective, params, x, y),
                      jnp.float64, "all 9")


def test_the_last_layer_is_exact_in_any_net():
    model = nets.build_mlp(6, 3, hidden_layers=2, hidden_units=5, activation="tanh",
                           output_activation="tanh")
    objective = losses.Objective(losses.mean_squared_error(), 0.1)
    params, x, y = problem(model, objective, 6, 3, targets="plus_minus_one")
    backpropagated, exact = backpropagated_and_exact(model, objective, params, x, y)
    assert_close_tree(backpropagated[-2], exact[-2], jnp.float64, "output layer")
    # deeper layers: the diagonal approximation differs (cross terms), and is still positive
    assert relative_error(backpropagated[0]["w"], exact[0]["w"]) > 1e-3
    assert all(bool(jnp.all(leaf >= 0)) for leaf in jax.tree.leaves(backpropagated))


def test_dense_and_activation_curvature_by_hand():
    """Dense: d2w = (x^2)^T d2y; tanh: d2x = (1 - y^2)^2 d2y."""
    dense = layers.Dense(2)
    params = {"w": jnp.array([[1.0, -2.0], [3.0, 0.5]]), "b": jnp.zeros(2)}
    x = jnp.array([[2.0, -1.0]])
    _, residuals = dense.forward(params, x)
    d2params, d2x = dense.curvature(params, residuals, jnp.array([[1.0, 4.0]]))
    np.testing.assert_allclose(d2params["w"], [[4.0, 16.0], [1.0, 4.0]])
    np.testing.assert_allclose(d2params["b"], [1.0, 4.0])
    np.testing.assert_allclose(d2x, [[1.0 + 16.0, 9.0 + 1.0]])
    tanh = layers.Tanh()
    y, residuals = tanh.forward((), jnp.array([[0.5]]))
    _, d2x = tanh.curvature((), residuals, jnp.array([[2.0]]))
    np.testing.assert_allclose(d2x, 2.0 * (1 - np.tanh(0.5) ** 2) ** 2, rtol=F64)


def conv_problem(conv, size):
    model = layers.serial(conv, layers.Tanh(), nets.Flatten(), layers.Dense(1, name="readout"))
    _, params = model.init(jax.random.key(0), (-1, size, size, 3))
    params = astype(params, jnp.float64)
    x = jax.random.normal(jax.random.key(1), (3, size, size, 3), jnp.float64)
    objective = losses.Objective(losses.mean_squared_error(), 0.2)
    y = jnp.ones((3, 1), jnp.float64)
    return backpropagated_and_exact(model, objective, params, x, y)


def test_conv_curvature_is_exact_where_each_weight_is_used_once():
    """A kernel covering the whole (-1-padded) input: one position, no sharing, no cross
    terms, so the backpropagated diagonal is the exact Gauss-Newton diagonal, pad^2 included."""
    backpropagated, exact = conv_problem(
        nets.Conv2D(2, 4, padding=((1, 1), (1, 1)), pad_value=-1.0), 2)
    assert_close_tree(backpropagated, exact, jnp.float64, "conv")


def test_shared_weights_are_where_the_diagonal_approximation_differs():
    """Unshared biases are used once (exact); a shared kernel sums over positions, whose
    cross terms the diagonal approximation drops (LeCun 1989, section 5)."""
    backpropagated, exact = conv_problem(
        nets.Conv2D(2, 3, stride=2, padding="SAME", pad_value=-1.0, unshared_bias=True), 7)
    assert_close_tree(backpropagated[0]["b"], exact[0]["b"], jnp.float64, "unshared bias")
    assert_close_tree(backpropagated[-1], exact[-1], jnp.float64, "readout")
    assert relative_error(backpropagated[0]["w"], exact[0]["w"]) > 1e-3


def curvature_and_hessian_diagonal(loss, outputs, y):
    """(loss.curvature, the diagonal of jax.hessian of loss.value), (batch, classes) each, in
    the outputs, compiled as one program (op by op, jax.hessian compiles its many
    operations apart)."""

    @jax.jit
    def both(outputs, y):
        hessian = jax.hessian(lambda o: loss.value(o, y))(outputs)
        return loss.curvature(outputs, y), jnp.einsum("bcbc->bc", hessian)

    return both(outputs, y)


@pytest.mark.parametrize("targets", ["one_hot", "soft"])
def test_loss_curvatures_are_the_diagonal_of_jax_hessian(targets):
    """Each loss's curvature against the diagonal of jax.hessian of its value, float64; with
    one-hot rows and with rows of other masses (0.7/0.3, a 2, a 0.5 and an all-zero row), on
    which the softmax and MAP curvatures scale by the row's sum."""
    z = jax.random.normal(jax.random.key(0), (4, 4), jnp.float64)
    y = (jax.nn.one_hot(jnp.array([0, 2, 3, 1]), 4, dtype=jnp.float64) if targets == "one_hot"
         else jnp.array([[0.7, 0.3, 0, 0], [0, 0, 2, 0], [0, 0, 0, 0.5], [0, 0, 0, 0]],
                        jnp.float64))
    for loss, outputs in ((losses.mean_squared_error(), z),
                          (losses.sigmoid_cross_entropy(), z),
                          (losses.sigmoid_cross_entropy(from_logits=False), jax.nn.sigmoid(z)),
                          (losses.softmax_cross_entropy(), z),
                          (losses.lecun1998_map(1.0), z)):
        curvature, diagonal = curvature_and_hessian_diagonal(loss, outputs, y)
        assert relative_error(curvature, diagonal) <= F64, loss.name


def test_hessian_reference_agrees_with_gauss_newton_at_zero_residual():
    """MSE with outputs equal to targets: the Hessian is exactly J^T J (no residual term)."""
    model = nets.build_mlp(3, 2, hidden_units=4, activation="tanh")
    objective = losses.Objective(losses.mean_squared_error(), 0.0)
    params, x, _ = problem(model, objective, 3, 2)
    y = model.apply(params, x)
    assert_close_tree(gradcheck.hessian_diagonal(model, objective, params, x, y),
                      gradcheck.gauss_newton_diagonal(model, objective, params, x, y),
                      jnp.float64, "zero residual")


def test_diagonal_levenberg_marquardt_step():
    rule = optim.diagonal_levenberg_marquardt(0.1, mu=0.5)
    params = {"w": jnp.array([1.0, 1.0])}
    state = rule.init(params)
    grads = {"w": jnp.array([2.0, -4.0])}
    updates, state = rule.update(grads, state, params, curvature={"w": jnp.array([1.5, 0.0])})
    np.testing.assert_allclose(updates["w"], [-0.1 * 2 / 2.0, 0.1 * 4 / 0.5])
    updates, _ = rule.update(grads, state, params)  # keeps the last estimate
    np.testing.assert_allclose(updates["w"], [-0.1, 0.8])
    chained = optax.chain(rule)
    assert chained.init(params) is not None
    with pytest.raises(ValueError, match="mu must be > 0"):
        optim.diagonal_levenberg_marquardt(0.1, mu=0.0)


def test_a_layer_without_curvature_is_named():
    model = layers.serial(layers.Dense(2), layers.Layer("custom", *layers.Identity()[1:4]))
    with pytest.raises(ValueError, match="no curvature"):
        engines.curvature_diagonal(model, losses.Objective(losses.mean_squared_error()))


def pooled_net(pool, size):
    """conv 1x1 (2 maps, unshared biases) -> pool -> tanh -> readout, float64 params, and a
    batch of 4 random (size, size, 3) inputs."""
    model = layers.serial(nets.Conv2D(2, 1, unshared_bias=True, name="conv"), pool,
                          layers.Tanh(), nets.Flatten(), layers.Dense(1, name="readout"))
    _, params = model.init(jax.random.key(0), (-1, size, size, 3))
    x = jax.random.normal(jax.random.key(1), (4, size, size, 3), jnp.float64)
    return model, astype(params, jnp.float64), x


def curvature_and_gauss_newton(model, params, x):
    """(the backpropagated diagonal, the exact Gauss-Newton diagonal from jax's jacobians),
    mean squared error against zero targets."""
    objective = losses.Objective(losses.mean_squared_error(), 0.0)
    y = jnp.zeros((x.shape[0], 1), jnp.float64)
    return backpropagated_and_exact(model, objective, params, x, y)


@pytest.mark.parametrize("pool", [nets.AvgPool(2), nets.MaxPool(2), nets.Subsampling(2)])
def test_pooling_curvature_is_exact_on_single_path_parameters(pool):
    """Unshared conv biases reach the output through the pooling by one path each, so their
    diagonal (and the subsampling coefficient, used once per example) is exact."""
    backpropagated, exact = curvature_and_gauss_newton(*pooled_net(pool, 2))
    assert_close_tree(backpropagated[0]["b"], exact[0]["b"], jnp.float64, "biases")
    assert_close_tree(backpropagated[1:], exact[1:], jnp.float64, "after the pooling")


def test_max_pool_curvature_at_ties_is_the_gauss_newton_diagonal():
    """Ties in every window (zeros after a ReLU, repeated values): the Jacobian's 1/k
    entries, squared, against the exact Gauss-Newton diagonal of the conv biases behind the
    pooling, each of which reaches the output by one path."""
    model, params, x = pooled_net(nets.MaxPool(2), 4)
    # w = 0 and b constant per 2x2 block pair: every window of the conv's output ties
    params[0]["w"] = jnp.zeros_like(params[0]["w"])
    params[0]["b"] = jnp.asarray(np.repeat(np.repeat([[0.5, 1.0], [1.5, 0.5]], 2, 0), 2, 1)
                                 [:, :, None] * np.array([1.0, -1.0]), jnp.float64)
    backpropagated, exact = curvature_and_gauss_newton(model, params, x)
    assert_close_tree(backpropagated[0]["b"], exact[0]["b"], jnp.float64, "tied biases")
    assert float(jnp.min(exact[0]["b"])) > 0


def test_curvature_experiment_rows_on_the_small_nets():
    from experiments import curvature

    entries = {entry[0]: entry for entry in curvature.nets_to_compare()}
    rows = curvature.compare(*entries["mlp_2_hidden_tanh"], batch=4, seed=0)
    by_layer = {(r["layer"], r["param"]): r for r in rows}
    assert by_layer[("output", "w")]["backpropagated_vs_gauss_newton"] <= F64
    assert by_layer[("hidden1", "w")]["backpropagated_vs_gauss_newton"] > 1e-3
    assert all(r["gauss_newton_vs_hessian"] is not None for r in rows)


def test_curvature_through_batch_norm_is_exact_after_the_last_one_and_not_before():
    """After the last BatchNorm every parameter reaches each output by one path: exact. A
    bias just before a BatchNorm does not change the outputs at all, so its Gauss-Newton
    diagonal is 0 (up to rounding), while the diagonal rule, which drops the cross terms
    between the examples the BatchNorm couples, gives it a positive h."""
    from experiments import curvature

    entries = {entry[0]: entry for entry in curvature.nets_to_compare()}
    rows = curvature.compare(*entries["mlp_2_hidden_tanh_batchnorm"], batch=4, seed=0)
    by_layer = {(r["layer"], r["param"]): r for r in rows}
    for exact in (("norm2", "g"), ("norm2", "b"), ("output", "w"), ("output", "b")):
        assert by_layer[exact]["backpropagated_vs_gauss_newton"] <= F64, exact
    for bias in (("hidden1", "b"), ("hidden2", "b")):
        assert abs(by_layer[bias]["mean_gauss_newton"]) <= 1e-25
        assert by_layer[bias]["mean_backpropagated"] > 1e-3
    assert by_layer[("norm1", "g")]["backpropagated_vs_gauss_newton"] > 1e-3


def test_curvature_experiment_end_to_end_on_two_nets(tmp_path):
    """--nets picks nets; every tensor gets a row, the plot is written, and its points are the
    backpropagated and exact diagonals themselves: on the output layer, equal (a single path
    per output)."""
    from experiments import curvature

    assert tuple(entry[0] for entry in curvature.nets_to_compare()) == curvature.NAMES
    metrics = curvature.main(["--workdir", str(tmp_path), "--batch", "3",
                              "--nets", "mlp_2_hidden_tanh,small_conv"])
    document = json.loads((tmp_path / "results.json").read_text())
    assert {row["net"] for row in document["rows"]} == {"mlp_2_hidden_tanh", "small_conv"}
    assert len(document["rows"]) == 6 + 4
    assert set(document["seconds"]) == {"mlp_2_hidden_tanh_wall", "small_conv_wall"}
    assert all(seconds > 0 for seconds in document["seconds"].values())
    assert metrics["max_backpropagated_vs_gauss_newton_where_exact"] <= F64
    assert (tmp_path / "curvature.png").stat().st_size > 20_000
    entry = {entry[0]: entry for entry in curvature.nets_to_compare()}["mlp_2_hidden_tanh"]
    tensors = curvature.diagonals(*entry, batch=3, seed=0)
    panels = curvature.plot_panels("mlp_2_hidden_tanh", tensors)
    assert [panel["title"] for panel in panels] == ["mlp_2_hidden_tanh",
                                                   "mlp_2_hidden_tanh: Hessian"]
    exact, backpropagated = panels[0]["series"]["output"]
    assert exact.size == 3 * 5 + 3
    np.testing.assert_allclose(backpropagated, exact, rtol=F64)


def test_lecun1998_schedule_by_hand():
    """LeCun et al. 1998, Appendix C: 5e-4 for 2 passes, 2e-4 for 3, 1e-4 for 3, 5e-5 for 4,
    then 1e-5 (here 10 updates a pass)."""
    schedule = optim.lecun1998_schedule(5e-4, 10)
    expected = {0: 5e-4, 19: 5e-4, 20: 2e-4, 49: 2e-4, 50: 1e-4, 80: 5e-5, 119: 5e-5,
                120: 1e-5, 500: 1e-5}
    for count, eta in expected.items():
        assert float(schedule(count)) == pytest.approx(eta, rel=1e-6), count


def squared_jacobian_pullback(apply, x, d2y):
    """sum_j (dy_j / dx_i)^2 d2y_j from jax.jacobian: the diagonal rule's d2x."""
    jacobian = jax.jacobian(apply)(x)
    return jnp.tensordot(d2y, jacobian**2, axes=d2y.ndim)


def curvature_and_squared_jacobian(layer, x, d2y, key=None):
    """(layer.curvature's (d2params, d2x) from its own forward's residuals, the
    `squared_jacobian_pullback` of its output at x), for a layer without params (key: its
    dropout mask), compiled as one program (op by op, jax.jacobian compiles its many
    operations apart)."""

    def apply(x):
        return layers.forward_with_key(layer, (), x, key)[0]

    @jax.jit
    def both(x, d2y):
        _, residuals = layers.forward_with_key(layer, (), x, key)
        return layer.curvature((), residuals, d2y), squared_jacobian_pullback(apply, x, d2y)

    return both(x, d2y)


@pytest.mark.parametrize("make_layer, shape, key", [
    (lambda: nets.LocalResponseNorm(size=5, k=0.5, alpha=0.3, beta=0.75), (2, 2, 2, 7), None),
    (lambda: nets.LocalResponseNorm(size=3, k=1.0, alpha=0.8, beta=0.6), (1, 3, 1, 4), None),
    (lambda: nets.Dropout(0.4), (3, 5), 7),
    (lambda: nets.Dropout(0.4), (3, 5), None),
    (lambda: nets.recurrent.LastStep(), (2, 4, 3), None),
    (lambda: models.ScaledTanh(), (3, 5), None),
    *[(lambda make=make, name=name: make(name=name), (3, 5), None)
      for name, make in nets.ACTIVATIONS.items()],
    (lambda: nets.LeakyRelu(0.3), (3, 5), None),
    (lambda: nets.Elu(0.4), (3, 5), None),
])
def test_parameter_free_curvature_is_the_squared_jacobian(make_layer, shape, key):
    """d2x of local response normalisation (its alpha large enough that the cross-channel
    terms count), dropout with and without a mask, LastStep, LeCun's scaled tanh and every
    elementwise activation, against sum_j J_ji^2 d2y_j from jax.jacobian, float64."""
    layer = make_layer()
    x = jax.random.normal(jax.random.key(1), shape, jnp.float64)
    rng = None if key is None else jax.random.key(key)
    y = jax.eval_shape(lambda x: layers.forward_with_key(layer, (), x, rng)[0], x)
    d2y = jax.random.uniform(jax.random.key(2), y.shape, jnp.float64)
    (_, d2x), expected = curvature_and_squared_jacobian(layer, x, d2y, rng)
    assert relative_error(d2x, expected) <= F64


def test_channel_groups_curvature_is_exact_for_a_last_layer():
    """AlexNet's two-tower convolution (nets.models.channel_groups) as the last layer under
    MSE: each weight enters linearly, so the backpropagated diagonal is the exact Gauss-Newton
    diagonal of jax's Jacobian."""
    from nets import models

    conv = models.channel_groups(nets.Conv2D(2, 3, padding="SAME", name="conv"), groups=2,
                                 name="towers")
    model = nets.serial(conv, nets.Flatten(), name="net")
    objective = losses.Objective(losses.mean_squared_error(), 0.0)
    _, params = model.init(jax.random.key(0), (-1, 4, 4, 4))
    params = astype(params, jnp.float64)
    x = jax.random.normal(jax.random.key(1), (3, 4, 4, 4), jnp.float64)
    y = jax.random.normal(jax.random.key(2), (3, 64), jnp.float64)
    assert_close_tree(*backpropagated_and_exact(model, objective, params, x, y),
                      jnp.float64, "channel groups")


def test_euclidean_rbf_curvature_is_gauss_newton_plus_the_penalty_quadratic():
    """LeNet-5's RBF output: d2x is the squared-Jacobian pullback of d2s (jax.jacobian) plus
    2/m, the second derivative of the correct class's penalty at its bound. Where every class
    is far from x (MAP's q = 0 in float64) that is the exact Hessian diagonal of
    E(x) = MAP(RBF(x)) (jax.hessian): d2s vanishes, and 2/m is all the curvature left."""
    centres = np.sign(np.arange(15).reshape(3, 5) % 3 - 0.5)
    layer = nets.EuclideanRBF(centres)
    x = jax.random.normal(jax.random.key(1), (4, 5), jnp.float64)
    s = jax.eval_shape(lambda x: layer.forward((), x)[0], x)
    d2s = jax.random.uniform(jax.random.key(2), s.shape, jnp.float64)
    (dparams, d2x), expected = curvature_and_squared_jacobian(layer, x, d2s)
    assert dparams == ()
    assert relative_error(d2x - 2 / 4, expected) <= F64

    loss = losses.lecun1998_map(1.0)
    far = 40 + x  # every squared distance >= 5 * 39^2: exp(-y) is 0 in float64
    targets = jax.nn.one_hot(jnp.array([0, 1, 2, 0]), 3, dtype=jnp.float64)

    @jax.jit  # one program
    def curvature_and_exact(far, targets):
        scores, residuals = layer.forward((), far)
        _, d2x = layer.curvature((), residuals, loss.curvature(scores, targets))
        hessian = jax.hessian(lambda x: loss.value(layer.apply((), x), targets))(far)
        return d2x, jnp.einsum("bfbf->bf", hessian)

    d2x, exact = curvature_and_exact(far, targets)
    assert float(jnp.max(jnp.abs(exact - 2 / 4))) == 0.0
    assert relative_error(d2x, exact) <= F64


def test_with_a_key_the_diagonal_holds_the_dropout_masks_fixed():
    """One hidden layer with dropout on it and one output (a single path: exact): with a key,
    the backpropagated diagonal is diag(J^T H J) of the net with those masks (J by
    jax.jacobian of model.apply with the key, H by jax.hessian of the loss); without one, the
    net at inference, which differs."""
    model = nets.serial(nets.dropout_after(nets.Dense(6, name="hidden"), 0.5),
                        nets.Tanh(name="act"), nets.Dense(1, name="output"))
    objective = losses.Objective(losses.mean_squared_error(), 0.0)
    params, x, y = problem(model, objective, 4, 1, batch=5)
    key = jax.random.key(7)
    diagonal = jax.jit(engines.curvature_diagonal(model, objective))

    @jax.jit  # one program
    def write_out(params, x, y, key):
        flat, unravel = jax.flatten_util.ravel_pytree(params)
        jacobian = jax.jacobian(lambda p: model.apply(unravel(p), x, key))(flat).reshape(5, -1)
        outputs = model.apply(params, x, key)
        hessian = jax.hessian(lambda o: objective.loss.value(o.reshape(5, 1), y))(
            outputs.reshape(-1))
        return unravel(jnp.einsum("op,oq,qp->p", jacobian, hessian, jacobian))

    expected = write_out(params, x, y, key)
    assert_close_tree(diagonal(params, x, y, key), expected, jnp.float64, "with masks")
    assert relative_error(diagonal(params, x, y)[0]["w"], expected[0]["w"]) > 0.1
