"""The exact Hessian's product H v by hand (Pearlmutter's R-operator through the backward
passes, `nets.engines.hessian_product`) against jax: each layer's `backward_tangent` against
`jax.jvp` of `jax.vjp` of its apply, whole nets against `jax.jvp` of `jax.grad` of E, the
matrix against `jax.hessian`, central differences of the gradient, a one-unit net's H worked
out by hand, and H = G where the residuals vanish."""
import jax
import jax.extend
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest

import nets
from nets import gradcheck, models
from nets.conv import IMPLEMENTATIONS
from nets.engines import gauss_newton_product, hessian_product
from nets.recurrent import scan_cell
from tests.helpers import F64, assert_close_tree, random_layer_point, random_like
from tests.test_gauss_newton import (
    assert_alexnet_product_is_its_reference,
    assert_product_holds_the_masks_of_a_key,
    assert_product_is_its_reference,
)
from tests.test_recurrent_gauss_newton import MASK, cell_point

LENET1989_CONV = dict(kernel_size=5, stride=2, padding=((2, 2), (2, 2)), pad_value=-1.0,
                      unshared_bias=True)


def assert_backward_tangent_is_jax(layer, input_shape, dtype, scale=1.0, seed=0, params=None):
    """layer.backward_tangent's (g_params, g_x, R{g_params}, R{g_x}) against jax: the pullback
    of layer.apply at (params, x) for g_y, and `jax.jvp` of that pullback as a function of
    (params, x, g_y) along (v_params, v_x, r_g_y); with v_x None, along a zero v_x. params:
    the layer's initial ones moved (`random_layer_point`) unless given."""
    params, x, v_params, v_x, keys = random_layer_point(layer, input_shape, dtype, scale, seed,
                                                        params, more=2)
    y_shape = jax.eval_shape(layer.apply, params, x).shape
    g_y, r_g_y = (jax.random.normal(key, y_shape, dtype) for key in keys)

    def pullback(params, x, g_y):
        return jax.vjp(layer.apply, params, x)[1](g_y)

    @jax.jit
    def both(params, x, v_params, v_x, g_y, r_g_y):
        return (layer.backward_tangent(params, x, v_params, v_x, g_y, r_g_y),
                layer.backward_tangent(params, x, v_params, None, g_y, r_g_y),
                jax.jvp(pullback, (params, x, g_y), (v_params, v_x, r_g_y)),
                jax.jvp(pullback, (params, x, g_y), (v_params, jnp.zeros_like(v_x), r_g_y)))

    with jax.default_matmul_precision("highest"):
        got, got_still, (g_ref, r_g_ref), (_, r_g_still_ref) = both(
            params, x, v_params, v_x, g_y, r_g_y)
    for (g_params, g_x, r_g_params, r_g_x), r_g_want, what in (
            (got, r_g_ref, "v_x"), (got_still, r_g_still_ref, "v_x None")):
        assert_close_tree((g_params, g_x), g_ref, dtype, f"{layer.name} gradient")
        assert_close_tree((r_g_params, r_g_x), r_g_want, dtype, f"{layer.name} R, {what}")
        assert r_g_x.shape == x.shape and r_g_x.dtype == x.dtype


@pytest.mark.parametrize("activation", sorted(nets.ACTIVATIONS))
def test_every_activation_backward_tangent_is_jax(activation, dtype):
    """g_x = g_y f'(x) and R{g_x} = R{g_y} f'(x) + g_y f''(x) v_x: each f'' by hand."""
    assert_backward_tangent_is_jax(nets.ACTIVATIONS[activation](), (4, 7), dtype, scale=2.0)


@pytest.mark.parametrize("layer, input_shape", [
    (nets.Dense(5), (3, 4)),
    (nets.Dense(3), (6, 4)),  # above OUTER_PRODUCTS_MAX_BATCH: dw as one product
    (models.ScaledTanh(), (3, 4)),
    (nets.Elu(0.7), (3, 4)),
    (nets.LeakyRelu(0.2), (3, 4)),
    (nets.EuclideanRBF(np.random.default_rng(0).normal(size=(6, 4))), (3, 4)),
    (nets.Flatten(), (2, 3, 3, 2)),
    (nets.AvgPool(2), (2, 4, 6, 3)),
    (nets.AvgPool((2, 3), (1, 2)), (2, 5, 7, 2)),
    (nets.MaxPool(3, 2), (2, 7, 7, 3)),
    (nets.MaxPool((2, 3), (2, 1)), (2, 6, 7, 2)),
    (nets.Subsampling(2), (2, 4, 6, 3)),
    (nets.serial(nets.Dense(4), nets.Tanh(), nets.Dense(3), nets.Sigmoid()), (3, 5)),
    (nets.residual(nets.serial(nets.Dense(4), nets.Silu(), nets.Dense(4))), (3, 4)),
    (nets.parallel(nets.Dense(2), nets.serial(nets.Dense(3), nets.Softplus())), (3, 4)),
    (nets.remat(nets.serial(nets.Dense(4), nets.Gelu(approximate=True), nets.Dense(2))), (3, 4)),
    (nets.LayerNorm(5), (3, 5)),
    (nets.LayerNorm(3), (2, 4, 4, 3)),
    (nets.BatchNorm(5), (6, 5)),
    (nets.BatchNorm(3), (2, 4, 4, 3)),
    (nets.SelfAttention(8, 2), (2, 5, 8)),
    (nets.SelfAttention(6, 3, causal=False), (2, 4, 6)),
    (nets.PositionalEmbedding(6, 4), (2, 5, 4)),
    (nets.TimeDistributed(nets.serial(nets.Dense(3), nets.Gelu())), (2, 4, 5)),
    (nets.LocalResponseNorm(3, k=1.0, alpha=0.2), (2, 3, 3, 6)),
    (models.channel_groups(nets.LocalResponseNorm(3, alpha=0.3), 2), (2, 3, 3, 6)),
    (models.channel_groups(nets.Dense(2), 2), (3, 6)),
    (nets.rnn(nets.elman(4)), (2, 5, 3)),
    (nets.rnn(nets.elman(3, "sigmoid"), reverse=True), (2, 5, 3)),
    (nets.rnn(nets.elman(4), truncation=2, unroll=2), (2, 5, 3)),
    (nets.bidirectional(nets.elman(3), nets.elman(2)), (2, 4, 3)),
    (nets.recurrent.LastStep(), (2, 4, 3)),
    (nets.recurrent.FinalStates(2), (2, 4, 5)),
], ids=lambda value: getattr(value, "name", None) or str(value))
def test_layer_backward_tangent_is_jax(layer, input_shape, dtype):
    assert_backward_tangent_is_jax(layer, input_shape, dtype)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("layer_args, input_shape", [
    (dict(out_channels=3, kernel_size=3), (2, 6, 7, 2)),
    (dict(out_channels=4, kernel_size=(3, 2), stride=(2, 1), padding="SAME", pad_value=-1.0),
     (2, 7, 6, 2)),
    (dict(out_channels=4, **LENET1989_CONV, connection_table=np.asarray(
        [[1, 0, 1, 1], [0, 1, 1, 0], [1, 1, 0, 1]])), (2, 8, 8, 3)),
    (dict(out_channels=4, kernel_size=3, feature_group_count=2, padding="SAME"), (2, 5, 5, 4)),
    (dict(out_channels=5, kernel_size=4), (2, 4, 4, 3)),  # one window: a Dense layer's products
], ids=["valid", "strided_same_border", "lenet1989_table_unshared", "grouped", "whole_input"])
def test_conv_backward_tangent_is_jax(layer_args, input_shape, implementation, dtype):
    """Every implementation's own transposed products, moved in both factors; a constant
    border does not move (v_x padded with zeros)."""
    layer = nets.Conv2D(implementation=implementation, **layer_args)
    assert_backward_tangent_is_jax(layer, input_shape, dtype)


HESSIAN_CASES = ("mlp_lecture_l2", "mlp_probabilities", "mlp_softmax_mass", "lenet1989_mse",
                 "rbf_map", "lenet5_softmax", "residual_mlp_layernorm", "transformer_lm",
                 "transformer_lm_tied", "rnn_elman_last_step_softmax", "rnn_lstm_gru_per_step",
                 "rnn_bidirectional_per_step", "rnn_bidirectional_last_step_mse",
                 "rnn_lstm_truncated")


@pytest.mark.parametrize("name", HESSIAN_CASES)
def test_hessian_product_is_jax_jvp_of_grad(name, dtype):
    """Whole nets under each kind of loss (tests/test_gauss_newton.py's points): LeNet-1989
    with its -1 borders, unshared biases and H2's table under squared error, LeNet-5 with
    trainable subsampling and C3's table under softmax with L2, Euclidean RBF units under the
    MAP criterion, MLPs under the lecture's objective, a residual MLP with LayerNorm, a
    one-block GELU transformer under the sequence cross-entropy, with its output tied to its
    embedding and not."""
    assert_product_is_its_reference(hessian_product, gradcheck.hessian_product_reference,
                                    name, dtype)


@pytest.mark.parametrize("model", [models.lenet1989_modern(), models.lenet5(output="rbf")],
                         ids=["lenet1989_modern", "lenet5_rbf"])
def test_hessian_product_of_relu_max_pool_and_rbf_nets_is_jax(model):
    """ReLU and max pooling (f'' = 0, the maxima fixed) and LeNet-5's own output, float64."""
    shape = (16, 16, 1) if "1989" in model.name else (32, 32, 1)
    objective = (nets.Objective(nets.lecun1998_map(), 0.01) if "rbf" in model.name
                 else nets.Objective(nets.softmax_cross_entropy(), 0.0))
    params = gradcheck.astype(model.init(jax.random.key(0), (-1, *shape))[1], jnp.float64)
    x = jax.random.uniform(jax.random.key(1), (2, *shape), jnp.float64, -1, 1)
    targets = jax.nn.one_hot(jnp.asarray([3, 7]), 10, dtype=jnp.float64)
    v = random_like(jax.random.key(2), params, jnp.float64)
    got = jax.jit(hessian_product(model, objective))(params, x, targets, v)
    want = jax.jit(gradcheck.hessian_product_reference(model, objective))(params, x, targets, v)
    assert_close_tree(got, want, jnp.float64, model.name)


def test_batch_norm_with_fixed_statistics_backward_tangent_is_jax(dtype):
    """With fixed "mean" and "var" (the inference network) directions of those move the
    gradients too: the 1/s and 1/s^2 of dmean and dvar differentiated in var."""
    rng = np.random.default_rng(5)
    params = {"g": rng.normal(size=4), "b": rng.normal(size=4), "mean": rng.normal(size=4),
              "var": rng.uniform(0.5, 2.0, size=4)}
    assert_backward_tangent_is_jax(nets.BatchNorm(4), (3, 4), dtype, params=params)


def test_synced_batch_norm_backward_tangent_over_shards_is_the_whole_batchs():
    """BatchNorm(axis_name=...) under `jax.vmap` over 2 shards of a batch of 6: each shard's
    R{dx} is its rows of the unmapped layer's on the whole batch, and the shards' R{dg},
    R{db} sum to the whole batch's (float64)."""
    whole, synced = nets.BatchNorm(4), nets.BatchNorm(4, axis_name="shards")
    keys = jax.random.split(jax.random.key(3), 6)
    params = gradcheck.astype(whole.init(keys[0], (-1, 4))[1], jnp.float64)
    v_params = random_like(keys[1], params, jnp.float64)
    x, v_x, g_y, r_g_y = (jax.random.normal(key, (6, 4), jnp.float64) for key in keys[2:])
    want = whole.backward_tangent(params, x, v_params, v_x, g_y, r_g_y)

    def shard(z):
        return z.reshape(2, 3, 4)

    got = jax.vmap(lambda *a: synced.backward_tangent(params, a[0], v_params, *a[1:]),
                   axis_name="shards")(shard(x), shard(v_x), shard(g_y), shard(r_g_y))
    summed = jax.tree.map(lambda leaf: jnp.sum(leaf, axis=0), (got[0], got[2]))
    assert_close_tree(summed, (want[0], want[2]), jnp.float64, "params")
    assert_close_tree((got[1].reshape(6, 4), got[3].reshape(6, 4)), (want[1], want[3]),
                      jnp.float64, "dx")


def test_embedding_backward_tangent_is_jax():
    """Token ids have no tangent: R{dw} is the scatter-add of R{dy}, against `jax.jvp` of the
    pullback in (w, dy)."""
    layer = nets.Embedding(5, 3)
    params = gradcheck.astype(layer.init(jax.random.key(0), (-1, 4))[1], jnp.float64)
    ids = jnp.asarray([[0, 4, 2, 2], [1, 3, 0, 4]])
    v_params = random_like(jax.random.key(1), params, jnp.float64)
    g_y, r_g_y = (jax.random.normal(jax.random.key(k), (2, 4, 3), jnp.float64) for k in (2, 3))

    def pullback(params, g_y):
        return jax.vjp(lambda p: layer.apply(p, ids), params)[1](g_y)[0]

    g_params, _, r_g_params, _ = layer.backward_tangent(params, ids, v_params, None, g_y, r_g_y)
    g_ref, r_g_ref = jax.jvp(pullback, (params, g_y), (v_params, r_g_y))
    assert_close_tree((g_params, r_g_params), (g_ref, r_g_ref), jnp.float64, "embedding")


@pytest.mark.parametrize("model", [
    nets.sequence_model([nets.elman(5), nets.elman(4, "sigmoid")], 7),
    nets.sequence_model([nets.elman(4), nets.elman(3)], 5, bidirectional=True),
    nets.sequence_model([nets.elman(4)], 3, bidirectional=True, last_step=True),
    nets.sequence_model([nets.elman(5)], 7, truncation=2),
], ids=["stack_per_step", "bidirectional_per_step", "bidirectional_final_states",
        "truncated"])
def test_elman_sequence_models_hessian_product_is_jax(model):
    """BPTT's R-operator (`scan_backward_tangent`): a tangent scan, then a reverse scan
    carrying dcarry and R{dcarry}; stacked, both directions, truncated (float64)."""
    params = gradcheck.astype(model.init(jax.random.key(0), (-1, 6, 3))[1], jnp.float64)
    x = jax.random.normal(jax.random.key(1), (3, 6, 3), jnp.float64)
    outputs = model.apply(params, x).shape[-1]
    if "final" in model.sublayers[-2].name.lower():
        objective = nets.Objective(nets.mean_squared_error(), 0.1)
        targets = jax.random.normal(jax.random.key(2), (3, outputs), jnp.float64)
    else:
        objective = nets.Objective(nets.sequence_cross_entropy(), 0.01)
        targets = jax.random.randint(jax.random.key(2), (3, 6), 0, outputs)
    v = random_like(jax.random.key(3), params, jnp.float64)
    got = jax.jit(hessian_product(model, objective))(params, x, targets, v)
    want = jax.jit(gradcheck.hessian_product_reference(model, objective))(params, x, targets, v)
    assert_close_tree(got, want, jnp.float64, model.name)


@pytest.mark.parametrize("cell", [nets.lstm(5), nets.lstm(4, peepholes=True), nets.gru(5),
                                  nets.gru_reset_after(4), nets.elman(5, "sigmoid")],
                         ids=lambda cell: cell.name)
@pytest.mark.parametrize("truncation", [None, 2], ids=["full", "truncated"])
def test_every_cell_hessian_product_is_jax_at_random_parameters(cell, truncation):
    """Each cell's `step_backward_tangent` through BPTT, every parameter random (nonzero
    biases, b_hn and peepholes, whose terms vanish at the initial zeros), per step under the
    sequence cross-entropy, over a first layer of the same cell (so that v_x moves too);
    float64 (every cell's float32 runs among HESSIAN_CASES)."""
    dtype = jnp.float64
    model = nets.sequence_model([cell, cell], 7, truncation=truncation)
    params = gradcheck.astype(model.init(jax.random.key(0), (-1, 6, 3))[1], dtype)
    params = jax.tree.map(lambda leaf, noise: leaf + 0.5 * noise, params,
                          random_like(jax.random.key(1), params, dtype))
    x = jax.random.normal(jax.random.key(2), (3, 6, 3), dtype)
    targets = jax.random.randint(jax.random.key(3), (3, 6), 0, 7)
    objective = nets.Objective(nets.sequence_cross_entropy(), 0.01)
    v = random_like(jax.random.key(4), params, dtype)
    with jax.default_matmul_precision("highest"):
        got = jax.jit(hessian_product(model, objective))(params, x, targets, v)
        want = jax.jit(gradcheck.hessian_product_reference(model, objective))(
            params, x, targets, v)
    assert_close_tree(got, want, dtype, cell.name)


@pytest.mark.parametrize("kind", nets.recurrent.CELLS)
def test_scan_backward_tangent_with_a_mask_is_jax_jvp_of_the_pullback(kind):
    """BPTT's R-operator over padded sequences (holes, an early end, a late start), plain
    and truncated every 2 steps: (dparams, dxs, R{dparams}, R{dxs}) against `jax.jvp` of
    `jax.vjp` of `scan_cell` with the mask, in (params, xs, dys) along (v_params, v_xs,
    R{dys}); a masked step's dx and R{dx} are zero (float64)."""
    cell, params, xs, _, (v_params, v_xs, _) = cell_point(kind, jnp.float64)
    keys = jax.random.split(jax.random.key(7), 2)
    dys = jax.random.normal(keys[0], (*xs.shape[:2], cell.hidden_size), jnp.float64)
    r_dys = jax.random.normal(keys[1], dys.shape, jnp.float64)
    for truncation in (None, 2):
        def pullback(params, xs, dys, truncation=truncation):
            _, vjp = jax.vjp(lambda p, x: scan_cell(cell, p, x, mask=MASK,
                                                    truncation=truncation)[0], params, xs)
            return vjp(dys)

        want, r_want = jax.jvp(pullback, (params, xs, dys), (v_params, v_xs, r_dys))
        got = nets.recurrent.scan_backward_tangent(cell, params, xs, v_params, v_xs, dys,
                                                   r_dys, truncation=truncation, mask=MASK)
        assert_close_tree(got, (*want, *r_want), jnp.float64, f"{kind} {truncation}")
        masked = MASK[..., None] == 0
        assert float(jnp.max(jnp.abs(jnp.where(masked, got[1], 0)))) == 0
        assert float(jnp.max(jnp.abs(jnp.where(masked, got[3], 0)))) == 0


def scans_in(jaxpr) -> int:
    """The `lax.scan`s in a jaxpr, those inside other primitives' jaxprs included."""
    count = 0
    for equation in jaxpr.eqns:
        count += equation.primitive.name == "scan"
        for param in equation.params.values():
            for inner in param if isinstance(param, (tuple, list)) else [param]:
                if isinstance(inner, jax.extend.core.ClosedJaxpr):
                    count += scans_in(inner.jaxpr)
                elif isinstance(inner, jax.extend.core.Jaxpr):
                    count += scans_in(inner)
    return count


@pytest.mark.parametrize("model, layers", [
    (nets.sequence_model([nets.lstm(4)], 3), 1),
    (nets.sequence_model([nets.gru(4), nets.elman(3)], 3, dropout=0.5), 2),
    (nets.sequence_model([nets.gru_reset_after(4)], 3, bidirectional=True), 2),
], ids=["lstm", "stack_with_dropout", "bidirectional"])
def test_hessian_product_scans_each_sequence_once_each_way(model, layers):
    """H v runs each recurrent layer's forward scan once (its tangent, keeping every step's
    values) and its reverse scan once from them: two scans a layer, through `serial`,
    `dropout_after` and `parallel` (the model's `tangent_backward`), where a tangent pass and
    then backward tangents would scan forward twice or three times."""
    params = model.init(jax.random.key(0), (-1, 5, 2))[1]
    x = jnp.ones((2, 5, 2), jnp.float32)
    targets = jnp.zeros((2, 5), jnp.int32)
    objective = nets.Objective(nets.sequence_cross_entropy(), 0.0)
    key = jax.random.key(1) if model.stochastic else None
    jaxpr = jax.make_jaxpr(hessian_product(model, objective))(params, x, targets, params, key)
    assert scans_in(jaxpr.jaxpr) == 2 * layers


def test_a_cell_without_tangent_parts_recomputes_its_steps_to_the_same_product():
    """A cell with only `step_tangent` and `step_backward_tangent` (a user's, here the LSTM's
    own without its `tangent_parts`) keeps (carry, x_t, v_carry, v_x) and recomputes each
    step in the reverse scan: the same H v as jax's."""
    own = nets.lstm(4)._replace(tangent_parts=None, name="own_lstm")
    model = nets.sequence_model([own], 3)
    params = gradcheck.astype(model.init(jax.random.key(0), (-1, 5, 2))[1], jnp.float64)
    x = jax.random.normal(jax.random.key(1), (2, 5, 2), jnp.float64)
    targets = jax.random.randint(jax.random.key(2), (2, 5), 0, 3)
    objective = nets.Objective(nets.sequence_cross_entropy(), 0.01)
    v = random_like(jax.random.key(3), params, jnp.float64)
    got = jax.jit(hessian_product(model, objective))(params, x, targets, v)
    want = jax.jit(gradcheck.hessian_product_reference(model, objective))(params, x, targets, v)
    assert_close_tree(got, want, jnp.float64, own.name)


def test_scan_backward_tangent_refuses_a_bare_cell_directions_unlike_params_mixed_dtypes():
    cell = nets.elman(3)
    params = cell.init(jax.random.key(0), 2)
    xs = jnp.ones((1, 4, 2), jnp.float32)
    ys = jnp.ones((1, 4, 3), jnp.float32)
    bare = nets.lstm(3)._replace(step_backward_tangent=None, name="own_lstm")
    with pytest.raises(ValueError, match="scan_backward_tangent\\(own_lstm\\): this cell has "
                                         "no step backward tangent"):
        nets.recurrent.scan_backward_tangent(bare, bare.init(jax.random.key(0), 2), xs,
                                             params, None, ys, ys)
    with pytest.raises(ValueError, match="v_params"):
        nets.recurrent.scan_backward_tangent(cell, params, xs, {"w": params["w"]}, None, ys,
                                             ys)
    with pytest.raises(ValueError, match="input x has dtype float64 and the params"):
        nets.recurrent.scan_backward_tangent(cell, params, xs.astype(jnp.float64), params,
                                             None, ys, ys)


def small_conv_net():
    """A conv net of 59 parameters with every kind of layer that has an R-operator here."""
    model = nets.serial(nets.Conv2D(2, 3, padding="SAME", pad_value=-1.0), nets.Tanh(),
                        nets.MaxPool(2), nets.Subsampling(1), nets.Sigmoid(), nets.Flatten(),
                        nets.Dense(3), nets.Gelu())
    objective = nets.Objective(nets.mean_squared_error(), 0.2)
    params = gradcheck.astype(model.init(jax.random.key(1), (-1, 4, 4, 1))[1], jnp.float64)
    x = jax.random.normal(jax.random.key(2), (4, 4, 4, 1), jnp.float64)
    targets = jnp.where(jax.random.bernoulli(jax.random.key(3), 0.5, (4, 3)), 1.0, -1.0)
    return model, objective, params, x, targets


def columns(product, params, x, targets):
    """The matrix of `product` (params, x, targets, v) -> like params, one column per
    coordinate of params."""
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    stacked = jax.jit(jax.vmap(lambda e: jax.flatten_util.ravel_pytree(
        product(params, x, targets, unravel(e)))[0]))(jnp.eye(flat.size))
    return np.asarray(stacked).T


def test_hessian_columns_are_jax_hessian_and_indefinite():
    """H e_i for every coordinate of the small conv net: the matrix `jax.hessian` of E gives,
    symmetric, and (at a random point) indefinite, unlike G (tests/test_gauss_newton.py)."""
    model, objective, params, x, targets = small_conv_net()
    matrix = columns(hessian_product(model, objective), params, x, targets)

    def energy(flat):
        p = jax.flatten_util.ravel_pytree(params)[1](flat)
        return objective.value(p, model.apply(p, x), targets)

    exact = np.asarray(jax.jit(jax.hessian(energy))(jax.flatten_util.ravel_pytree(params)[0]))
    assert gradcheck.relative_error(matrix, exact) <= F64
    assert np.abs(matrix - matrix.T).max() <= F64 * np.abs(matrix).max()
    eigenvalues = np.linalg.eigvalsh((matrix + matrix.T) / 2)
    assert eigenvalues.min() < -1e-3 * eigenvalues.max()


def test_hessian_product_is_central_differences_of_the_gradient():
    """H v = (g(w + h v) - g(w - h v)) / 2h + O(h^2), g the manual engine's gradient: float64,
    h = 1e-6, within the finite-difference tolerance."""
    model, objective, params, x, targets = small_conv_net()
    v = random_like(jax.random.key(4), params, jnp.float64)
    grad = jax.jit(lambda p: nets.manual(model, objective)(p, x, targets)[1])
    h = gradcheck.FINITE_DIFFERENCE_STEP
    moved = [grad(jax.tree.map(lambda w, d, s=s: w + s * h * d, params, v)) for s in (1, -1)]
    differences = jax.tree.map(lambda a, b: (a - b) / (2 * h), *moved)
    got = jax.jit(hessian_product(model, objective))(params, x, targets, v)
    error = gradcheck.relative_error(jax.flatten_util.ravel_pytree(got)[0],
                                     jax.flatten_util.ravel_pytree(differences)[0])
    assert error <= gradcheck.TOLERANCES["float64"]["vs_finite_diff"]


def test_one_unit_hessian_worked_out_by_hand():
    """y = tanh(x w + b) under E = (1/2m) sum (y - t)^2: with e = y - t and f' = 1 - y^2,
    f'' = -2 y f', the Hessian in (w, b) is (1/m) sum (f'^2 + e f'') [x^2, x; x, 1], in NumPy.
    The e f'' term is what Gauss-Newton leaves out."""
    rng = np.random.default_rng(7)
    x, t = rng.normal(size=(6, 1)), rng.uniform(-0.9, 0.9, size=(6, 1))
    params = ({"w": rng.normal(size=(1, 1)), "b": rng.normal(size=1)}, ())
    model = nets.serial(nets.Dense(1), nets.Tanh())
    objective = nets.Objective(nets.mean_squared_error(), 0.0)
    y = np.tanh(x * params[0]["w"][0, 0] + params[0]["b"][0])
    slope = 1 - y**2
    weight = (slope**2 + (y - t) * (-2 * y * slope))[:, 0] / 6
    exact = np.array([[np.sum(weight * x[:, 0] ** 2), np.sum(weight * x[:, 0])],
                      [np.sum(weight * x[:, 0]), np.sum(weight)]])
    product = hessian_product(model, objective)
    for column, v in enumerate((([[1.0]], [0.0]), ([[0.0]], [1.0]))):
        v = ({"w": jnp.asarray(v[0]), "b": jnp.asarray(v[1])}, ())
        got = product(jax.tree.map(jnp.asarray, params), jnp.asarray(x), jnp.asarray(t), v)
        np.testing.assert_allclose([got[0]["w"][0, 0], got[0]["b"][0]], exact[:, column],
                                   rtol=1e-13)


def test_hessian_is_gauss_newton_where_the_residuals_vanish():
    """With the targets set to the net's own outputs, E's gradient at the outputs is zero,
    every term of H beyond J^T H_loss J vanishes, and H v = G v (float64)."""
    model, objective, params, x, _ = small_conv_net()
    targets = model.apply(params, x)
    v = random_like(jax.random.key(5), params, jnp.float64)
    hv = jax.jit(hessian_product(model, objective))(params, x, targets, v)
    gv = jax.jit(gauss_newton_product(model, objective))(params, x, targets, v)
    assert_close_tree(hv, gv, jnp.float64, "H v against G v")
    shift = jax.random.normal(jax.random.key(6), targets.shape, jnp.float64)
    away = jax.jit(hessian_product(model, objective))(params, x, targets + shift, v)
    assert gradcheck.relative_error(jax.flatten_util.ravel_pytree(away)[0],
                                    jax.flatten_util.ravel_pytree(gv)[0]) > 1e-3


@pytest.mark.parametrize("name", ["mlp_dropout", "transformer_lm_dropout", "rnn_dropout"])
def test_hessian_product_holds_the_dropout_masks_of_a_key(name, dtype):
    """H of E with one key's masks held fixed (Dropout, dropout_after, a transformer's
    dropout), against jax's jvp of grad through apply with that key; another key, another
    H v."""
    assert_product_holds_the_masks_of_a_key(
        hessian_product, gradcheck.hessian_product_reference, name, dtype)


@pytest.mark.runs_long
def test_alexnet_hessian_product_is_jax_with_its_dropout_masks():
    """LRN's second derivatives in two channel groups, grouped convolutions, dropout."""
    assert_alexnet_product_is_its_reference(hessian_product,
                                            gradcheck.hessian_product_reference)


@pytest.mark.parametrize("model, refused", [
    (nets.serial(nets.Dense(3), nets.layers.elementwise(jnp.tanh, lambda y: 1 - y * y,
                                                        name="own_tanh"), nets.Dense(2)),
     "own_tanh"),  # an activation built without its second derivative
    (nets.sequence_model([nets.lstm(3)._replace(step_backward_tangent=None, name="own_lstm")],
                         2, last_step=True), "own_lstm"),
], ids=["without_second_derivative", "cell_without_one"])
def test_layers_without_an_r_operator_are_refused_by_name(model, refused):
    with pytest.raises(ValueError, match=f"layer '{refused}[^']*' has no backward_tangent"):
        hessian_product(model, nets.Objective(nets.mean_squared_error(), 0.0))


def test_a_loss_without_a_hessian_vector_product_a_stray_key_and_a_double_f2_are_refused():
    squared = nets.losses.Loss("plain", lambda o, t: jnp.sum((o - t) ** 2),
                               lambda o, t: 2 * (o - t))
    with pytest.raises(ValueError, match="plain: this loss defines no Hessian-vector product"):
        hessian_product(nets.Dense(2), nets.Objective(squared))
    model = nets.serial(nets.Dense(2), nets.Tanh())
    params = model.init(jax.random.key(0), (-1, 3))[1]
    x, targets = jnp.ones((4, 3)), jnp.zeros((4, 2))
    with pytest.raises(ValueError, match="a key was given, but no layer in it draws random"):
        hessian_product(model, nets.Objective(nets.mean_squared_error()))(
            params, x, targets, params, jax.random.key(1))
    with pytest.raises(ValueError, match="abs: a piecewise linear f has f'' = 0; give no "
                                         "second_derivative"):
        nets.layers.elementwise(jnp.abs, jnp.sign, of="input", piecewise_linear=True,
                                second_derivative=jnp.zeros_like, name="abs")
