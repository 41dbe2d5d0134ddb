"""`parallel` and `residual`: backward against jax.vjp, hand-computed values, curvature,
accounting, keys and errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nets
from nets import engines, gradcheck, layers, losses
from tests.helpers import assert_close_tree, assert_remat_matches_the_plain_model


def vjp_reference(layer, params, x, dy):
    """(dparams, dx) from jax.vjp of layer.apply: the independent reference."""
    _, pullback = jax.vjp(layer.apply, params, x)
    return pullback(dy)


def generic(params, key, dtype):
    """params moved off their initial values (zero biases hide errors), cast to dtype."""
    flat, unravel = jax.flatten_util.ravel_pytree(gradcheck.astype(params, dtype))
    return unravel(flat + 0.3 * jax.random.normal(key, flat.shape, dtype))


def check_backward(model, input_shape, dtype, seed=0):
    keys = jax.random.split(jax.random.key(seed), 4)
    _, params = model.init(keys[0], (-1, *input_shape[1:]))
    params = generic(params, keys[1], dtype)
    x = jax.random.normal(keys[2], input_shape, dtype)
    dy = jax.random.normal(keys[3], jax.eval_shape(model.apply, params, x).shape, dtype)

    @jax.jit
    def manual_and_reference(params, x, dy):
        y, residuals = model.forward(params, x)
        return y, model.backward(params, residuals, dy), vjp_reference(model, params, x, dy)

    y, manual, reference = manual_and_reference(params, x, dy)
    assert_close_tree(manual, reference, dtype, model.name)
    return y


def branches(widths):
    return [layers.Dense(widths[0], name="dense"),
            layers.serial(layers.Dense(widths[1], name="inner"), layers.Tanh(name="tanh")),
            layers.Identity(name="identity")]


@pytest.mark.parametrize("batch", [1, 7])
def test_parallel_concat_backward_matches_vjp(batch, dtype):
    model = layers.parallel(*branches((3, 4)), name="concat")
    y = check_backward(model, (batch, 5), dtype)
    assert y.shape == (batch, 3 + 4 + 5)


def test_parallel_sum_backward_matches_vjp(dtype):
    model = layers.parallel(*branches((5, 5)), combine="sum", name="sum")
    assert check_backward(model, (6, 5), dtype).shape == (6, 5)


def test_residual_blocks_in_a_net_match_vjp(dtype):
    block = layers.serial(layers.Dense(6, name="a"), layers.Relu(name="relu"),
                          layers.Dense(6, name="b"))
    model = layers.serial(layers.Dense(6, name="in"), layers.Tanh(name="tanh"),
                          layers.residual(block, name="res1"),
                          layers.residual(layers.serial(layers.Dense(6, name="c"),
                                                        layers.Tanh(name="t2")), name="res2"),
                          layers.Dense(3, name="out"))
    check_backward(model, (8, 4), dtype)


def test_inception_block_of_convolutions_concatenated_on_channels(dtype):
    """NHWC: 1x1, 3x3 and 5x5 'SAME' convolutions side by side, joined on the channel axis."""
    model = layers.parallel(
        nets.Conv2D(2, 1, name="1x1"),
        layers.serial(nets.Conv2D(3, 3, padding="SAME", name="3x3"), layers.Relu(name="r")),
        nets.Conv2D(4, 5, padding="SAME", name="5x5"), name="inception")
    assert check_backward(model, (2, 6, 6, 3), dtype).shape == (2, 6, 6, 9)


def test_parallel_by_hand():
    """[x, x]: dx = dy's two halves added; x + x: dx = 2 dy; a residual around a zero block
    is the identity, dx = dy, and the block's dw = x^T dy."""
    x = jnp.array([[1.0, -2.0]])
    dy = jnp.array([[10.0, 20.0, 300.0, 400.0]])
    twice = layers.parallel(layers.Identity(), layers.Identity())
    y, residuals = twice.forward(((), ()), x)
    np.testing.assert_array_equal(y, [[1.0, -2.0, 1.0, -2.0]])
    np.testing.assert_array_equal(twice.backward(((), ()), residuals, dy)[1], [[310.0, 420.0]])
    doubled = layers.parallel(layers.Identity(), layers.Identity(), combine="sum")
    y, residuals = doubled.forward(((), ()), x)
    np.testing.assert_array_equal(y, 2 * x)
    np.testing.assert_array_equal(doubled.backward(((), ()), residuals, dy[:, :2])[1],
                                  [[20.0, 40.0]])
    block = layers.Dense(2, name="zero")
    params = ((), {"w": jnp.zeros((2, 2)), "b": jnp.zeros(2)})
    around = layers.residual(block)
    y, residuals = around.forward(params, x)
    np.testing.assert_array_equal(y, x)
    (_, dblock), dx = around.backward(params, residuals, dy[:, :2])
    np.testing.assert_array_equal(dx, dy[:, :2])
    np.testing.assert_array_equal(dblock["w"], [[10.0, 20.0], [-20.0, -40.0]])


def test_parallel_curvature_is_exact_where_each_branch_reaches_the_outputs_once():
    """Two Dense branches concatenated into the outputs: every weight reaches one output by
    one path, so the backpropagated diagonal is jax's exact Gauss-Newton diagonal."""
    model = layers.parallel(layers.Dense(3, name="left"),
                            layers.serial(layers.Dense(2, name="right"), layers.Tanh()))
    objective = losses.Objective(losses.mean_squared_error(), 0.0)
    keys = jax.random.split(jax.random.key(0), 4)
    params = generic(model.init(keys[0], (-1, 4))[1], keys[1], jnp.float64)
    x = jax.random.normal(keys[2], (5, 4), jnp.float64)
    y = jax.random.normal(keys[3], (5, 5), jnp.float64)
    assert_close_tree(jax.jit(engines.curvature_diagonal(model, objective))(params, x, y),
                      gradcheck.gauss_newton_diagonal(model, objective, params, x, y),
                      jnp.float64, "parallel")


def test_accounting_counts_every_branch_on_the_same_input():
    """Dense 5->3 and 5->4 side by side: 7 units, 3*6 + 4*6 = 42 parameters and connections,
    35 multiply-adds; a residual counts its block."""
    count = nets.count_model(layers.parallel(layers.Dense(3, name="a"), layers.Dense(4, name="b")),
                             (-1, 5))
    assert (count.neurons, count.params, count.connections, count.macs) == (7, 42, 42, 35)
    count = nets.count_model(layers.residual(layers.Dense(5, name="block")), (-1, 5))
    assert (count.neurons, count.params, count.macs) == (5, 30, 25)


def manual_and_autodiff(model, objective, params, x, targets, key=None):
    """(E, gradient) of engines.manual and of engines.autodiff (jax.grad), both with `key`,
    compiled as one program."""

    @jax.jit
    def run(params, x, targets, key):
        return (engines.manual(model, objective)(params, x, targets, key),
                engines.autodiff(model, objective)(params, x, targets, key))

    return run(params, x, targets, key)


def test_each_stochastic_branch_draws_its_own_mask_and_the_engines_agree():
    model = layers.serial(layers.parallel(nets.Dropout(0.5, name="a"), nets.Dropout(0.5, name="b")),
                          layers.Dense(2, name="out"))
    assert model.stochastic
    _, params = model.init(jax.random.key(0), (-1, 40))
    x = jnp.ones((3, 40), jnp.float32)
    key = jax.random.key(5)
    y, _ = model.sublayers[0].forward(params[0], x, key=key)
    assert not np.array_equal(y[:, :40] == 0, y[:, 40:] == 0)
    objective = losses.Objective(losses.mean_squared_error(), 0.0)
    targets = jnp.zeros((3, 2), jnp.float32)
    manual, autodiff = manual_and_autodiff(model, objective, params, x, targets, key)
    assert_close_tree(manual, autodiff, jnp.float32, "dropout branches")


def test_bad_combinations_are_named():
    with pytest.raises(ValueError, match="join: needs at least one branch"):
        layers.parallel(name="join")
    with pytest.raises(ValueError, match=r"join: combine must be one of \('concat', 'sum'\), "
                                         r"got 'mean'"):
        layers.parallel(layers.Identity(), combine="mean", name="join")
    unequal = layers.parallel(layers.Dense(3), layers.Dense(4), combine="sum", name="join")
    with pytest.raises(ValueError, match=r"join: combine='sum' needs equal branch output "
                                         r"shapes, got \[\(-1, 3\), \(-1, 4\)\]"):
        unequal.init(jax.random.key(0), (-1, 5))
    pooled = layers.parallel(nets.Conv2D(2, 3, name="valid"), nets.Conv2D(2, 1, name="same"),
                             name="join")
    with pytest.raises(ValueError, match="join: combine='concat' needs branch outputs equal in "
                                         "all but the last axis"):
        pooled.init(jax.random.key(0), (-1, 5, 5, 1))
    model = layers.parallel(layers.Dense(3), layers.Dense(4), name="join")
    _, params = model.init(jax.random.key(0), (-1, 5))
    with pytest.raises(ValueError, match="join: params must hold 2 layer entries, got 1"):
        model.apply(params[:1], jnp.ones((2, 5)))
    with pytest.raises(ValueError, match=r"Dense: input x has shape \(2, 6\)"):
        model.apply(params, jnp.ones((2, 6)))


def test_layer_outputs_are_each_layer_applied_in_turn():
    """A 3-2-1 tanh net with weights set by hand: the hidden layer's output is
    tanh(x w1 + b1) worked out in NumPy, and the last output is model.apply's."""
    model = nets.serial(nets.Dense(2, name="hidden"), nets.Tanh(name="hidden_act"),
                        nets.Dense(1, name="out"))
    params = ({"w": jnp.array([[1.0, -1.0], [0.5, 0.0], [0.0, 2.0]]), "b": jnp.array([0.1, 0.2])},
              (), {"w": jnp.array([[3.0], [-1.0]]), "b": jnp.array([0.5])})
    x = jnp.array([[1.0, 2.0, 3.0]])
    outputs = nets.layer_outputs(model, params, x)
    assert [name for name, _ in outputs] == ["hidden", "hidden_act", "out"]
    np.testing.assert_allclose(outputs[1][1], np.tanh([[2.1, 5.2]]), rtol=1e-6)
    np.testing.assert_array_equal(outputs[-1][1], model.apply(params, x))
    with pytest.raises(ValueError, match="'hidden' is not a serial model"):
        nets.layer_outputs(model.sublayers[0], params[0], x)


def remat_net(width, blocks, rate=0.0, wrap=True):
    """Dense-tanh-Dense-tanh blocks (each in `remat` when wrap; with dropout after the first
    tanh when rate > 0) and a Dense readout of 3."""
    def block(index):
        inner = [layers.Dense(width, name=f"d{index}a"), layers.Tanh()]
        if rate:
            inner.append(nets.Dropout(rate, name=f"drop{index}"))
        inner += [layers.Dense(width, name=f"d{index}b"), layers.Tanh()]
        made = layers.serial(*inner, name=f"block{index}")
        return layers.remat(made) if wrap else made

    return layers.serial(*(block(index) for index in range(blocks)),
                         layers.Dense(3, name="out"))


def test_remat_blocks_give_jax_grads_gradients_and_the_plain_curvature():
    """Two `remat` blocks (one with dropout) under a key, float64: the manual gradient equals
    jax.grad of the same model with the same key (1e-10), and the unwrapped model's manual
    gradient (the same masks from the key); its curvature diagonal equals the unwrapped
    model's (which test_curvature checks); the forward keeps only each block's input and
    key; the counts are the unwrapped model's."""
    model, plain = remat_net(6, 2, rate=0.3), remat_net(6, 2, rate=0.3, wrap=False)
    assert model.stochastic and [layer.name for layer in model.sublayers[:2]] == [
        "block0", "block1"]
    keys = jax.random.split(jax.random.key(1), 4)
    params = generic(model.init(keys[0], (-1, 5))[1], keys[1], jnp.float64)
    x = jax.random.normal(keys[2], (7, 5), jnp.float64)
    targets = jax.random.normal(keys[3], (7, 3), jnp.float64)
    objective = losses.Objective(losses.mean_squared_error(), 0.1)
    key = jax.random.key(9)
    assert_remat_matches_the_plain_model(model, plain, objective, (params, x, targets, key),
                                         "remat")
    _, residuals = model.forward(params, x, key=key)
    kept = [leaf.shape for leaf in jax.tree.leaves(residuals[:2])
            if not jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key)]
    assert kept == [(7, 5), (7, 6)]
    assert nets.count_model(model, (-1, 5)) == nets.count_model(plain, (-1, 5))


def test_remat_per_example_gradients_and_ghost_norms_match_the_unwrapped_model():
    """Under vmap over examples (the predicate of remat's cond is not batched) and through
    `ghost_norms` (a remat'd Dense keeps its factors): the unwrapped model's values."""
    from training import parallel

    model = layers.serial(layers.remat(layers.Dense(4, name="first")), layers.Tanh(),
                          layers.remat(layers.serial(layers.Dense(4), layers.Tanh())),
                          layers.Dense(2, name="out"))
    plain = layers.serial(layers.Dense(4, name="first"), layers.Tanh(),
                          layers.serial(layers.Dense(4), layers.Tanh()),
                          layers.Dense(2, name="out"))
    assert model.sublayers[0].factors is not None
    keys = jax.random.split(jax.random.key(2), 4)
    params = generic(model.init(keys[0], (-1, 3))[1], keys[1], jnp.float64)
    x = jax.random.normal(keys[2], (5, 3), jnp.float64)
    targets = jax.random.normal(keys[3], (5, 2), jnp.float64)
    objective = losses.Objective(losses.mean_squared_error(), 0.0)

    def per_example_and_ghost_norms(net):
        """Each example's manual gradient (jax.vmap over examples) and parallel.ghost_norms,
        compiled as one program."""
        value_and_grad = engines.manual(net, objective)

        @jax.jit
        def run(params, x, targets):
            per_example = jax.vmap(lambda xi, ti: value_and_grad(params, xi[None], ti[None])[1])
            return per_example(x, targets), parallel.ghost_norms(net, objective)(params, x, targets)

        return run(params, x, targets)

    remat_grads, remat_norms = per_example_and_ghost_norms(model)
    plain_grads, plain_norms = per_example_and_ghost_norms(plain)
    assert_close_tree(remat_grads, plain_grads, jnp.float64, "vmap")
    assert_close_tree(remat_norms, plain_norms, jnp.float64, "ghost norms")


def test_remat_blocks_cut_xlas_temporaries_of_the_step():
    """Eight remat'd blocks of width 64 at batch 512, float32: XLA's temporaries for the
    manual value_and_grad below 3/4 of the unwrapped model's (46.1 against 71.3 MB at width
    256, batch 4096, jax 0.10.2 on the CPU). With an optimization barrier on (x, dy) in
    place of remat's cond, XLA:CPU ran every second forward during the first and the
    temporaries rose to 1.47x the unwrapped model's."""
    objective = losses.Objective(losses.mean_squared_error(), 0.0)
    args = (jax.ShapeDtypeStruct((512, 64), jnp.float32),
            jax.ShapeDtypeStruct((512, 3), jnp.float32))

    def temporaries(model):
        params = jax.eval_shape(lambda: model.init(jax.random.key(0), (512, 64))[1])
        compiled = jax.jit(engines.manual(model, objective)).lower(params, *args).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    assert temporaries(remat_net(64, 8)) < 0.75 * temporaries(remat_net(64, 8, wrap=False))


def two_layers_one_matrix():
    """Dense a (3 -> 3), tanh, Dense b (3 -> 3) with b.w = a.w^T, and the same net untied."""
    untied = layers.serial(layers.Dense(3, name="a"), layers.Tanh(name="act"),
                           layers.Dense(3, name="b"), name="net")
    return nets.tie(untied, ("a", "w"), ("b", "w"), transpose=True), untied


def untied_params(tied_params):
    """The untied net's params at the tied net's point: b.w filled in as a.w^T."""
    a, act, b = tied_params
    return a, act, {**b, "w": a["w"].T}


def test_tie_keeps_one_matrix_and_sums_the_gradients_of_its_two_uses(dtype):
    """The tied net's params lack b.w; its outputs are the untied net's at b.w = a.w^T, and
    its gradient for a.w is the untied one's a.w + b.w^T (jax.grad of the untied forward):
    manual against that, and the gradient report (jax.grad of the tied forward, finite
    differences, the L2 penalty on the one matrix) in both dtypes; the curvature is the
    untied one's two diagonals summed."""
    tied, untied = two_layers_one_matrix()
    _, params = tied.init(jax.random.key(0), (-1, 3))
    assert set(params[2]) == {"b"}
    params = generic(params, jax.random.key(1), dtype)
    x = jax.random.normal(jax.random.key(2), (5, 3), dtype)
    targets = jax.random.normal(jax.random.key(3), (5, 3), dtype)
    # no penalty where the untied net is the reference: it would count the matrix twice
    objective = losses.Objective(losses.mean_squared_error(), 0.0)
    np.testing.assert_array_equal(tied.apply(params, x), untied.apply(untied_params(params), x))

    @jax.jit
    def gradients(params, x, targets):
        """The tied net's manual gradient, and jax.grad of the untied one at b.w = a.w^T."""
        reference = jax.grad(lambda p: objective.value(p, untied.apply(p, x), targets))(
            untied_params(params))
        return engines.manual(tied, objective)(params, x, targets)[1], reference

    manual, reference = gradients(params, x, targets)
    expected = (
        {**reference[0], "w": reference[0]["w"] + reference[2]["w"].T}, (),
        {"b": reference[2]["b"]})
    assert_close_tree(manual, expected, dtype, "tied net")
    report = gradcheck.gradient_report(tied, objective._replace(l2=0.1), params, x, targets,
                                       dtype=dtype)
    assert [(row["layer"], row["param"], row["passed"]) for row in report] == [
        ("a", "b", True), ("a", "w", True), ("b", "b", True)]
    if dtype == "float64":

        @jax.jit
        def curvatures(params, x, targets):
            """The tied net's curvature diagonal, and the untied one's at b.w = a.w^T."""
            return (engines.curvature_diagonal(tied, objective)(params, x, targets),
                    engines.curvature_diagonal(untied, objective)(untied_params(params), x,
                                                                  targets))

        tied_h, untied_h = curvatures(params, x, targets)
        assert_close_tree(tied_h, ({**untied_h[0], "w": untied_h[0]["w"] + untied_h[2]["w"].T},
                                   (), {"b": untied_h[2]["b"]}), dtype, "tied curvature")


def test_tie_counts_the_shared_matrix_once_and_refuses_what_cannot_be_tied():
    tied, untied = two_layers_one_matrix()
    assert nets.count_model(untied, (-1, 3)).params - nets.count_model(tied, (-1, 3)).params == 9
    assert nets.count_model(tied, (-1, 3)).layer("b").params == 3
    wide = layers.serial(layers.Dense(3, name="a"), layers.Dense(4, name="b"), name="net")
    twins = layers.serial(layers.Dense(3, name="a"), layers.Dense(3, name="a"), name="net")
    for model, source, target, message in [
        (wide, ("a", "w"), ("b", "w"), r"net: a.w gives shape \(3, 3\), but b.w has shape "
                                       r"\(3, 4\)"),
        (wide, ("a", "w"), ("c", "w"), r"net: 0 layers are named 'c' \(one is needed\); the "
                                       r"layers are \['a', 'b'\]"),
        (wide, ("a", "g"), ("b", "w"), "net: layer 'a' has no parameter 'g'"),
        (twins, ("a", "w"), ("a", "b"), "net: 2 layers are named 'a'"),
    ]:
        with pytest.raises(ValueError, match=message):
            nets.tie(model, source, target).init(jax.random.key(0), (-1, 3))
    with pytest.raises(ValueError, match=r"net: source and target are the same parameter"):
        nets.tie(wide, ("a", "w"), ("a", "w"))

