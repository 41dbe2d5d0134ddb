"""Self-attention, learned positions and the small transformer: backward passes against
jax.vjp, a NumPy forward, causality, the gradient report, accounting, training and errors."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import nets
from nets import engines, gradcheck, losses
from nets.accounting import layer_kind
from nets.attention import PositionalEmbedding, SelfAttention, transformer_lm
from nets.recurrent import sequence_cross_entropy
from tests.helpers import (
    F64,
    assert_close_tree,
    assert_remat_matches_the_plain_model,
    backward_and_vjp,
)
from training import optim


def perturbed(params, dtype, seed, scale=0.3):
    """params cast to dtype and moved off their initial values (biases away from 0)."""
    flat, unravel = jax.flatten_util.ravel_pytree(gradcheck.astype(params, dtype))
    return unravel(flat + scale * jax.random.normal(jax.random.key(seed), flat.shape, dtype))


def random_attention(shape, heads, causal, dtype, seed=0):
    layer = SelfAttention(shape[-1], heads, causal=causal, name="attention")
    _, params = layer.init(jax.random.key(seed), (-1, *shape[1:]))
    x = jax.random.normal(jax.random.key(seed + 1), shape, dtype)
    return layer, perturbed(params, dtype, seed + 2), x


def numpy_attention(params, x, heads, causal):
    """The forward pass head by head and step by step in float64 NumPy, an independent
    reference for the einsum forward."""
    p = jax.tree.map(np.asarray, params)
    x = np.asarray(x, np.float64)
    batch, steps, features = x.shape
    width = features // heads
    y = np.zeros_like(x)
    for b in range(batch):
        qkv = x[b] @ p["qkv"]["w"] + p["qkv"]["b"]
        q, k, v = qkv[:, :features], qkv[:, features:2 * features], qkv[:, 2 * features:]
        o = np.zeros((steps, features))
        for h in range(heads):
            cols = slice(h * width, (h + 1) * width)
            for t in range(steps):
                seen = t + 1 if causal else steps
                scores = np.array([q[t, cols] @ k[s, cols] for s in range(seen)])
                weights = np.exp(scores / np.sqrt(width) - np.max(scores / np.sqrt(width)))
                weights /= weights.sum()
                o[t, cols] = sum(weights[s] * v[s, cols] for s in range(seen))
        y[b] = o @ p["out"]["w"] + p["out"]["b"]
    return y


def manual_backward(layer, params, x, dy):
    """The hand-written (dparams, dx) at x, from the layer's own forward's residuals,
    compiled as one program (run op by op, each operation compiles apart)."""

    @jax.jit
    def run(params, x, dy):
        _, residuals = layer.forward(params, x)
        return layer.backward(params, residuals, dy)

    return run(params, x, dy)


@pytest.mark.parametrize("shape, heads, causal", [
    ((1, 1, 4), 1, True), ((2, 5, 12), 3, True), ((2, 5, 12), 3, False),
    ((3, 7, 8), 8, True), ((2, 6, 6), 1, False)])
def test_backward_matches_vjp(shape, heads, causal, dtype):
    layer, params, x = random_attention(shape, heads, causal, dtype)
    dy = jax.random.normal(jax.random.key(9), shape, dtype)
    manual, reference = backward_and_vjp(layer, params, x, dy)
    assert_close_tree(manual, reference, dtype, f"SelfAttention{shape} heads={heads}")


@pytest.mark.parametrize("causal", [True, False])
def test_forward_matches_a_numpy_loop(causal):
    layer, params, x = random_attention((2, 5, 6), 2, causal, jnp.float64, seed=4)
    np.testing.assert_allclose(layer.apply(params, x), numpy_attention(params, x, 2, causal),
                               rtol=1e-12, atol=1e-12)


def test_one_step_attends_to_itself_only():
    """T = 1: the softmax over one score is 1, so y = (x W_v + b_v) W_o + b_o."""
    layer, params, x = random_attention((3, 1, 4), 2, True, jnp.float64, seed=6)
    w_v, b_v = params["qkv"]["w"][:, 8:], params["qkv"]["b"][8:]
    expected = ((x[:, 0] @ w_v + b_v[None, :]) @ params["out"]["w"]
                + params["out"]["b"][None, :])
    np.testing.assert_allclose(layer.apply(params, x)[:, 0], expected, rtol=1e-12)


def test_causal_outputs_ignore_the_future_and_its_gradient_is_zero():
    layer, params, x = random_attention((2, 6, 4), 2, True, jnp.float64, seed=7)
    later = x.at[:, 4:].add(5.0)
    np.testing.assert_allclose(layer.apply(params, later)[:, :4], layer.apply(params, x)[:, :4],
                               rtol=1e-12)
    dy = jnp.zeros_like(x).at[:, 2].set(1.0)
    _, dx = manual_backward(layer, params, x, dy)
    assert float(jnp.max(jnp.abs(dx[:, 3:]))) == 0.0
    assert float(jnp.min(jnp.abs(dx[:, :3]))) > 0.0
    full = SelfAttention(4, 2, causal=False)
    assert not np.allclose(full.apply(params, later)[:, :4], full.apply(params, x)[:, :4])


@pytest.mark.parametrize("steps", [3, 5])
def test_positions_backward_matches_vjp(steps, dtype):
    layer = PositionalEmbedding(5, 4, name="positions")
    _, params = layer.init(jax.random.key(0), (-1, steps, 4))
    params = gradcheck.astype(params, dtype)
    x = jax.random.normal(jax.random.key(1), (2, steps, 4), dtype)
    dy = jax.random.normal(jax.random.key(2), (2, steps, 4), dtype)
    manual, reference = backward_and_vjp(layer, params, x, dy)
    assert_close_tree(manual, reference, dtype, "positions")
    dparams, _ = manual
    assert np.all(np.asarray(dparams["p"][steps:]) == 0)


def small_lm(seed=0, dtype=jnp.float64, vocabulary=5, steps=6):
    """A 2-block transformer, its params moved off their init, ids (3, steps) and targets."""
    model = transformer_lm(vocabulary, context=8, features=8, heads=2, blocks=2)
    _, params = model.init(jax.random.key(seed), (-1, steps))
    ids = jax.random.randint(jax.random.key(seed + 1), (3, steps + 1), 0, vocabulary)
    return model, perturbed(params, dtype, seed + 2, 0.1), ids[:, :-1], ids[:, 1:]


def assert_the_report_passes(model, objective, params, x, targets, seed=None):
    """The gradient report (manual against jax.grad, and finite differences in float64) in
    float64 and float32, with no failing row; params moved off their init by `perturbed`
    with this seed, in each dtype, unless seed is None. Returns the float32 report."""
    for dtype in (jnp.float64, jnp.float32):
        point = params if seed is None else perturbed(params, dtype, seed, 0.1)
        report = gradcheck.gradient_report(model, objective, point, x, targets, dtype=dtype)
        failed = [(row["layer"], row["param"]) for row in report if not row["passed"]]
        assert failed == [], (jnp.dtype(dtype).name, failed)
    return report


def test_transformer_gradients_pass_the_report():
    """Every parameter tensor of a 2-block transformer: manual against jax.grad in float64
    and float32, and against finite differences."""
    model, params, x, targets = small_lm()
    report = assert_the_report_passes(model, losses.Objective(sequence_cross_entropy(), 0.0),
                                      params, x, targets)
    assert {"attention1", "attention2", "positions", "embed", "output"} <= {
        row["layer"] for row in report}


def test_transformer_with_gelu_passes_the_report_and_refuses_unknown_activations():
    """activation="gelu_tanh" (GPT-2's) puts nets.Gelu(approximate=True) in every block's MLP;
    its gradients pass the report in float64 and float32, with finite differences."""
    model = transformer_lm(5, context=8, features=8, heads=2, blocks=1,
                           activation="gelu_tanh")
    _, params = model.init(jax.random.key(3), (-1, 6))
    ids = jax.random.randint(jax.random.key(4), (3, 7), 0, 5)
    assert_the_report_passes(model, losses.Objective(sequence_cross_entropy(), 0.0), params,
                             ids[:, :-1], ids[:, 1:], seed=5)
    act = model.sublayers[3].sublayers[1].sublayers[2]  # block1_mlp: (identity, mix1)
    x = jnp.linspace(-3.0, 3.0, 7)
    assert act.name == "act1"
    np.testing.assert_array_equal(act.apply((), x), jax.nn.gelu(x, approximate=True))
    with pytest.raises(ValueError, match="lm: activation='swish'; choose one of"):
        transformer_lm(5, 8, activation="swish", name="lm")


def test_transformer_with_tied_embeddings_passes_the_report_and_counts_one_matrix():
    """tie_embeddings: the output's weights are the embedding's transposed; no output.w
    among the params, (vocabulary x features) fewer counted; the report passes in float64
    and float32 (the embedding's gradient now from both uses); attention maps still found."""
    tied = transformer_lm(7, context=8, features=8, heads=2, blocks=1, tie_embeddings=True)
    untied = transformer_lm(7, context=8, features=8, heads=2, blocks=1)
    _, params = tied.init(jax.random.key(3), (-1, 6))
    assert set(params[-1]) == {"b"}
    assert (nets.count_model(untied, (-1, 6)).params
            - nets.count_model(tied, (-1, 6)).params) == 7 * 8
    ids = jax.random.randint(jax.random.key(4), (3, 7), 0, 7)
    assert_the_report_passes(tied, losses.Objective(sequence_cross_entropy(), 0.01), params,
                             ids[:, :-1], ids[:, 1:], seed=5)
    assert list(nets.attention.attention_maps(tied, params, ids[:, :-1])) == ["attention1"]


def test_transformer_with_dropout_passes_the_report_with_one_key():
    """Dropout after the positions and in every residual branch: manual and jax.grad with the
    same masks (one key) agree, float64 and float32, and match finite differences; two keys
    give two outputs, and without a key the model is deterministic."""
    model = transformer_lm(5, context=8, features=8, heads=2, blocks=1, dropout=0.3)
    plain, _, x, targets = small_lm(seed=2)
    _, params = model.init(jax.random.key(2), (-1, 6))
    assert model.stochastic and not plain.stochastic
    assert ["drop0", "drop1a", "drop1b"] == [
        name for name, _ in _named_dropouts(model)]
    params = perturbed(params, jnp.float64, 11, 0.1)
    objective = losses.Objective(sequence_cross_entropy(), 0.0)
    for dtype in (jnp.float64, jnp.float32):
        report = gradcheck.gradient_report(model, objective, params, x, targets, dtype=dtype,
                                           key=jax.random.key(7))
        failed = [(row["layer"], row["param"]) for row in report if not row["passed"]]
        assert not failed, (jnp.dtype(dtype).name, failed)
    one, other = (model.apply(params, x, jax.random.key(k)) for k in (1, 2))
    assert not np.allclose(one, other)
    np.testing.assert_array_equal(model.apply(params, x), model.apply(params, x))
    with pytest.raises(ValueError, match="lm: dropout must lie in"):
        transformer_lm(5, 8, dropout=1.0, name="lm")


def _named_dropouts(layer):
    if layer.sublayers:
        for sublayer in layer.sublayers:
            yield from _named_dropouts(sublayer)
    elif nets.accounting.layer_kind(layer) == "Dropout":
        yield layer.name, layer


@pytest.mark.standard_promotion  # optax.adam
def test_training_learns_to_copy_the_previous_token():
    """Target at step t is the token at t - 1 (at t = 0 the token itself): only attention can
    fetch it. One block, the manual engine and Adam take the loss from 2.48 to 6e-4 nats in
    200 steps (measured); with position-wise layers alone (blocks=0) the best is (7/8) log 5
    = 1.41 on fresh data, and 1.41 was measured on these 64 sequences."""
    vocabulary, steps = 5, 8
    ids = jax.random.randint(jax.random.key(0), (64, steps), 0, vocabulary)
    targets = jnp.concatenate([ids[:, :1], ids[:, :-1]], axis=1)
    objective = losses.Objective(sequence_cross_entropy(), 0.0)

    def losses_over_training(blocks):
        model = transformer_lm(vocabulary, steps, features=16, heads=2, blocks=blocks)
        params = model.init(jax.random.key(1), (-1, steps))[1]
        value_and_grad = engines.manual(model, objective)
        optimizer = optax.adam(1e-2)

        def step(carry, _):
            params, state = carry
            energy, grad = value_and_grad(params, ids, targets)
            updates, state = optimizer.update(grad, state, params)
            return (optax.apply_updates(params, updates), state), energy

        _, energies = jax.jit(lambda p: jax.lax.scan(step, (p, optimizer.init(p)), None,
                                                     length=200))(params)
        return float(energies[0]), float(energies[-1])

    start, end = losses_over_training(1)
    assert start > 1.5 and end < 0.01, (start, end)
    assert losses_over_training(0)[1] > 1.2


def test_attention_maps_are_each_blocks_softmax_weights():
    """One map per block, (batch, heads, T, T), rows summing to 1 and zero above the diagonal;
    block 1's equals the softmax of its scores recomputed from its input by the NumPy loop's
    math (q k^T / sqrt(D) over visible steps)."""
    model, params, x, _ = small_lm(seed=5)
    maps = nets.attention.attention_maps(model, params, x)
    assert list(maps) == ["attention1", "attention2"]
    for p in maps.values():
        assert p.shape == (3, 2, 6, 6)
        np.testing.assert_allclose(jnp.sum(p, axis=-1), 1, rtol=1e-12)
        assert np.all(np.asarray(p)[:, :, np.triu_indices(6, 1)[0], np.triu_indices(6, 1)[1]]
                      == 0)
    embed, positions, (_, attend) = model.sublayers[0], model.sublayers[1], \
        model.sublayers[2].sublayers
    h = positions.apply(params[1], embed.apply(params[0], x))
    h = attend.sublayers[0].apply(params[2][1][0], h)
    w, b = np.asarray(params[2][1][1]["qkv"]["w"]), np.asarray(params[2][1][1]["qkv"]["b"])
    qkv = np.asarray(h) @ w + b
    q, k = qkv[..., 0:8].reshape(3, 6, 2, 4), qkv[..., 8:16].reshape(3, 6, 2, 4)
    scores = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(4)
    scores = np.where(np.tril(np.ones((6, 6), bool)), scores, -np.inf)
    expected = np.exp(scores - scores.max(-1, keepdims=True))
    expected /= expected.sum(-1, keepdims=True)
    np.testing.assert_allclose(maps["attention1"], expected, rtol=1e-10, atol=1e-15)


def test_accounting_by_hand():
    """F = 4, T = 3, causal: q k v and output neurons 4 T F = 48; weights 4 F^2 = 64 and
    biases 4 F = 16; connections T (64 + 16) = 240; multiply-adds T 64 + 2 F (1 + 2 + 3) =
    240. The per-step Dense in front counts T times its units, connections and macs. An
    Embedding of 5 tokens into F = 4 on T = 3 ids: 3 inputs, T F = 12 units of one connection
    each, 20 parameters, no multiply-adds."""
    model = nets.serial(nets.recurrent.TimeDistributed(nets.Dense(4, name="embed")),
                        PositionalEmbedding(3, 4, name="positions"),
                        SelfAttention(4, 2, name="attention"))
    count = nets.count_model(model, (-1, 3, 2))
    rows = {row.name: row for row in count.layers}
    assert (rows["embed"].units, rows["embed"].params, rows["embed"].connections,
            rows["embed"].macs) == (12, 12, 36, 24)
    assert (rows["positions"].units, rows["positions"].params) == (0, 12)
    attention = rows["attention"]
    assert (attention.units, attention.params, attention.connections, attention.macs) == (
        48, 80, 240, 240)
    full = nets.count_model(SelfAttention(4, 2, causal=False), (-1, 3, 4))
    assert full.macs == 3 * 64 + 2 * 4 * 9
    lookup = nets.count_model(nets.Embedding(5, 4, name="tokens"), (-1, 3))
    assert (lookup.inputs, lookup.layer("tokens").units, lookup.params, lookup.connections,
            lookup.macs) == (3, 12, 20, 12, 0)


def test_bad_sizes_shapes_and_curvature_are_named():
    with pytest.raises(ValueError, match=r"att: features \(6\) must be a multiple of heads "
                                         r"\(4\)"):
        SelfAttention(6, 4, name="att")
    with pytest.raises(ValueError, match="att: heads must be >= 1, got 0"):
        SelfAttention(6, 0, name="att")
    layer, params, x = random_attention((2, 3, 4), 2, True, jnp.float32)
    with pytest.raises(ValueError, match=r"attention: input x has shape \(2, 4\), expected "
                                         r"\(batch, time >= 1, 4\)"):
        layer.apply(params, x[:, 0])
    with pytest.raises(ValueError, match=r"attention: input x has shape \(2, 0, 4\)"):
        layer.apply(params, x[:, :0])
    _, residuals = layer.forward(params, x)
    for bad in [(1, 3, 4), (2, 1, 4), (2, 3, 1)]:  # each would broadcast in einsum
        with pytest.raises(ValueError, match=rf"attention: dy has shape {re.escape(str(bad))}"
                                             r", expected the output's \(2, 3, 4\)"):
            layer.backward(params, residuals, jnp.ones(bad))
        with pytest.raises(ValueError, match=r"attention: d2y has shape"):
            layer.curvature(params, residuals, jnp.ones(bad))
    positions = PositionalEmbedding(4, 2, name="pos")
    _, pos_params = positions.init(jax.random.key(0), (-1, 4, 2))
    with pytest.raises(ValueError, match="pos: input x has 5 steps, more than the 4 positions"):
        positions.apply(pos_params, jnp.ones((1, 5, 2)))
    dense = nets.Dense(3, name="mine")
    without = dense._replace(curvature=None)  # a layer of one's own, written without one
    model = nets.serial(nets.Dense(4, name="first"), nets.serial(without, name="inner"))
    objective = losses.Objective(losses.mean_squared_error(), 0.0)
    with pytest.raises(ValueError, match="serial: layer 'mine' has no curvature"):
        engines.curvature_diagonal(model, objective)


def squared_jacobian_pullback(function, inputs, d2out):
    """For each input array: sum_j (d out_j / d in_i)^2 d2out_j, from jax.jacobian."""
    jacobians = jax.jacobian(function, argnums=tuple(range(len(inputs))))(*inputs)
    return tuple(jnp.tensordot(d2out, j**2, axes=d2out.ndim) for j in jacobians)


def stagewise_curvature(params, x, heads, causal, d2y):
    """LeCun's diagonal rule through attention's five stages (projection, scores, softmax,
    mixing, output), each stage's squared Jacobian from jax.jacobian: the reference for
    SelfAttention.curvature, independent of its formulas."""
    batch, steps, features = x.shape
    width = features // heads
    mask = jnp.tril(jnp.ones((steps, steps), bool)) if causal else jnp.ones((steps, steps), bool)
    mask = mask[None, None]

    def heads_of(z):
        return z.reshape(batch, steps, heads, width)

    def project(w, b, x):
        return x @ w + b[None, None, :]

    def scores(q, k):
        return jnp.einsum("bthd,bshd->bhts", q, k) / np.sqrt(width)

    def softmax(s):
        e = jnp.where(mask, jnp.exp(s - jnp.max(s, axis=-1, keepdims=True)), 0.0)
        return e / jnp.sum(e, axis=-1, keepdims=True)

    def mix(p, v):
        return jnp.einsum("bhts,bshd->bthd", p, v).reshape(batch, steps, features)

    def output(w, b, o):
        return o @ w + b[None, None, :]

    qkv = project(params["qkv"]["w"], params["qkv"]["b"], x)
    q, k, v = (heads_of(z) for z in jnp.split(qkv, 3, axis=-1))
    s = scores(q, k)
    p = softmax(s)
    o = mix(p, v)
    d2w_o, d2b_o, d2o = squared_jacobian_pullback(
        output, (params["out"]["w"], params["out"]["b"], o), d2y)
    d2p, d2v = squared_jacobian_pullback(mix, (p, v), d2o)
    (d2s,) = squared_jacobian_pullback(softmax, (s,), d2p)
    d2q, d2k = squared_jacobian_pullback(scores, (q, k), d2s)
    d2qkv = jnp.concatenate([z.reshape(batch, steps, features) for z in (d2q, d2k, d2v)], -1)
    d2w, d2b, d2x = squared_jacobian_pullback(
        project, (params["qkv"]["w"], params["qkv"]["b"], x), d2qkv)
    return {"qkv": {"w": d2w, "b": d2b}, "out": {"w": d2w_o, "b": d2b_o}}, d2x


def curvature_and_stagewise_reference(layer, params, x, heads, causal, d2y):
    """(layer.curvature's (d2params, d2x) from its own forward's residuals, the same by
    `stagewise_curvature`), compiled as one program: op by op, the reference's Jacobians
    compiled some 170 single operations per shape."""

    @jax.jit
    def both(params, x, d2y):
        _, residuals = layer.forward(params, x)
        return (layer.curvature(params, residuals, d2y),
                stagewise_curvature(params, x, heads, causal, d2y))

    return both(params, x, d2y)


@pytest.mark.parametrize("shape, heads, causal", [
    ((2, 3, 4), 2, True), ((2, 3, 4), 2, False), ((1, 4, 6), 3, True), ((2, 1, 4), 1, True)])
def test_curvature_is_the_diagonal_rule_through_each_stage(shape, heads, causal):
    """SelfAttention.curvature against the stage-by-stage squared Jacobians of jax.jacobian,
    float64, <= 1e-10; every entry is >= 0."""
    layer, params, x = random_attention(shape, heads, causal, jnp.float64, seed=4)
    d2y = jax.random.uniform(jax.random.key(6), shape, jnp.float64)
    curvature, reference = curvature_and_stagewise_reference(layer, params, x, heads, causal,
                                                             d2y)
    assert_close_tree(curvature, reference, jnp.float64, f"SelfAttention{shape} curvature")
    assert all(float(jnp.min(leaf)) >= 0 for leaf in jax.tree.leaves(curvature))


def test_transformer_curvature_is_exact_after_the_last_block_and_an_approximation_before():
    """LeCun's backpropagated diagonal for a 2-block transformer (logits flattened, MSE against
    +-1) against the exact Gauss-Newton diagonal from jax's Jacobian: equal (float64, <= 1e-10)
    for the final LayerNorm and the output layer, which reach each output by one path; off by
    more than 10% for attention and the blocks before, where the stages and the residual sums
    drop cross terms; never negative."""
    model = nets.serial(transformer_lm(5, context=6, features=8, heads=2, blocks=2),
                        nets.Flatten(), name="lm")
    objective = losses.Objective(losses.mean_squared_error(), 0.0)
    _, params = model.init(jax.random.key(0), (-1, 6))
    params = perturbed(params, jnp.float64, 3, 0.1)
    ids = jax.random.randint(jax.random.key(1), (3, 6), 0, 5)
    targets = jnp.where(jax.random.bernoulli(jax.random.key(2), 0.5, (3, 30)), 1.0, -1.0)
    backpropagated = jax.jit(engines.curvature_diagonal(model, objective))(params, ids, targets)
    exact = gradcheck.gauss_newton_diagonal(model, objective, params, ids, targets)
    errors = {(layer, param): gradcheck.relative_error(a, b) for (layer, param, _), a, b in zip(
        gradcheck.named_parameters(model, params), jax.tree.leaves(backpropagated),
        jax.tree.leaves(exact))}
    for key in (("final_norm", "g"), ("final_norm", "b"), ("output", "w"), ("output", "b")):
        assert errors[key] <= F64, (key, errors[key])
    for key in (("attention1", "qkv.w"), ("attention2", "qkv.w"), ("attention1", "out.w")):
        assert errors[key] > 0.1, (key, errors[key])
    assert all(float(jnp.min(leaf)) >= 0 for leaf in jax.tree.leaves(backpropagated))


def test_lecuns_diagonal_method_trains_the_transformer():
    """The copy-the-previous-token task of the test above with LeCun's stochastic diagonal
    Levenberg-Marquardt steps eta / (mu + h), h backpropagated through attention and
    re-estimated every 10 steps: eta = 1e-2, mu = 1e-3 take the loss from 2.48 to 8e-5 nats in
    200 steps (measured; Adam 1e-2 reached 6e-4, plain gradient descent 4.8e-4 at its best
    rate, 1, and NaN at 3)."""
    vocabulary, steps = 5, 8
    ids = jax.random.randint(jax.random.key(0), (64, steps), 0, vocabulary)
    targets = jnp.concatenate([ids[:, :1], ids[:, :-1]], axis=1)
    objective = losses.Objective(sequence_cross_entropy(), 0.0)
    model = transformer_lm(vocabulary, steps, features=16, heads=2, blocks=1)
    params = model.init(jax.random.key(1), (-1, steps))[1]
    value_and_grad = engines.manual(model, objective)
    diagonal = engines.curvature_diagonal(model, objective)
    optimizer = optim.diagonal_levenberg_marquardt(1e-2, 1e-3)

    def step(carry, index):
        params, state = carry
        energy, grad = value_and_grad(params, ids, targets)
        h = jax.lax.cond(index % 10 == 0, lambda: diagonal(params, ids, targets),
                         lambda: state.curvature)
        updates, state = optimizer.update(grad, state, params, curvature=h)
        return (optax.apply_updates(params, updates), state), energy

    _, energies = jax.jit(lambda p: jax.lax.scan(step, (p, optimizer.init(p)),
                                                 jnp.arange(200)))(params)
    assert float(energies[0]) > 2.0 and float(energies[-1]) < 1e-3, energies[[0, -1]]


def test_transformer_with_remat_has_the_plain_gradients_and_curvature():
    """transformer_lm(remat=True), dropout on, one key, float64: the same params, the manual
    gradient equal to jax.grad's and to the plain model's manual one (the masks drawn again
    from the same key), the same curvature diagonal; each residual branch is a remat."""
    plain = transformer_lm(5, context=8, features=8, heads=2, blocks=2, dropout=0.3)
    model = transformer_lm(5, context=8, features=8, heads=2, blocks=2, dropout=0.3,
                           remat=True)
    assert [layer_kind(layer) for layer in model.sublayers].count("remat") == 4
    _, _, x, targets = small_lm(seed=3)
    params = perturbed(model.init(jax.random.key(3), (-1, 6))[1], jnp.float64, 12, 0.1)
    assert jax.tree.structure(params) == jax.tree.structure(
        plain.init(jax.random.key(3), (-1, 6))[1])
    objective = losses.Objective(sequence_cross_entropy(), 0.0)
    assert_remat_matches_the_plain_model(model, plain, objective,
                                         (params, x, targets, jax.random.key(8)),
                                         "remat transformer")


def test_sizes_params_and_directions_that_would_broadcast_are_refused_by_name():
    """Each was accepted without a word: 2.5 heads (an error deep in init's reshape), a str
    causal (true), a bias of one entry or an output matrix of one column (broadcast over the
    features), a direction of one example (broadcast over the batch), a gradient's tangent
    of one example; PositionalEmbedding's positions of one row (added to every step), a dy
    of one feature (set into every feature of dp), a NaN std."""
    with pytest.raises(ValueError, match="att: heads must be an int, got 2.5"):
        SelfAttention(10, 2.5, name="att")
    with pytest.raises(ValueError, match="att: causal must be True or False, got 'no'"):
        SelfAttention(4, 2, causal="no", name="att")
    layer, params, x = random_attention((2, 3, 4), 2, True, jnp.float64)
    for group, key, shape, expected in (("qkv", "b", (1,), (12,)), ("out", "w", (4, 1), (4, 4))):
        bad = {**params, group: {**params[group], key: jnp.ones(shape)}}
        with pytest.raises(ValueError, match=re.escape(
                f"attention: params {group} {key!r} has shape {shape}, expected {expected}")):
            layer.apply(bad, x)
    ones = jax.tree.map(jnp.ones_like, params)
    for bad in [(1, 3, 4), (2, 1, 4)]:
        with pytest.raises(ValueError, match=re.escape(
                f"attention: dx has shape {bad}, expected x's (2, 3, 4)")):
            layer.tangent(params, x, ones, jnp.ones(bad))
    with pytest.raises(ValueError, match=re.escape(
            "attention: dparams['out']['b'] has shape (1,), expected params['out']['b']'s (4,)")):
        layer.tangent(params, x, {**ones, "out": {**ones["out"], "b": jnp.ones(1)}}, None)
    with pytest.raises(ValueError, match=re.escape(
            "attention: R{dy} has shape (1, 3, 4), expected the output's (2, 3, 4)")):
        layer.backward_tangent(params, x, ones, None, jnp.ones(x.shape), jnp.ones((1, 3, 4)))

    positions = PositionalEmbedding(5, 4, name="pos")
    pos_params = gradcheck.astype(positions.init(jax.random.key(0), (-1, 3, 4))[1], x.dtype)
    with pytest.raises(ValueError, match=re.escape(
            "pos: params 'p' has shape (1, 4), expected (5, 4)")):
        positions.apply({"p": jnp.ones((1, 4))}, x)
    _, residuals = positions.forward(pos_params, x)
    for bad in [(1, 3, 4), (2, 2, 4), (2, 3, 1)]:
        with pytest.raises(ValueError, match=re.escape(
                f"pos: dy has shape {bad}, expected the output's (2, 3, 4)")):
            positions.backward(pos_params, residuals, jnp.ones(bad))
    with pytest.raises(ValueError, match=re.escape(
            "pos: dparams['p'] has shape (1, 4), expected params['p']'s (5, 4)")):
        positions.tangent(pos_params, x, {"p": jnp.ones((1, 4))}, None)
    with pytest.raises(ValueError, match="pos: std must be a finite number >= 0, got nan"):
        PositionalEmbedding(5, 4, std=float("nan"), name="pos")
    with pytest.raises(ValueError, match="pos: context must be an int, got 2.5"):
        PositionalEmbedding(2.5, 4, name="pos")
