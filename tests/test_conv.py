"""Conv2D: hand-written backward against jax.vjp, hand-computed values, a NumPy loop reference,
connection tables and shape errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nets import conv
from nets.gradcheck import relative_error
from tests.helpers import F64, assert_close_tree

# (name, layer kwargs, input shape): strides 1, 2, 3 (some not dividing H + pads - k), VALID,
# SAME, explicit and -1 padding, groups, a connection table, unshared bias.
CONFIGS = [
    ("valid", dict(out_channels=4, kernel_size=3), (2, 7, 6, 3)),
    ("same_stride2", dict(out_channels=5, kernel_size=3, stride=2, padding="SAME"), (2, 8, 7, 2)),
    ("explicit_minus1_stride3", dict(out_channels=3, kernel_size=(3, 2), stride=(3, 2),
                                     padding=((1, 2), (0, 1)), pad_value=-1.0), (1, 9, 8, 2)),
    ("lenet1989_h1", dict(out_channels=4, kernel_size=5, stride=2, padding=((2, 2), (2, 2)),
                          pad_value=-1.0, unshared_bias=True), (2, 10, 9, 1)),
    ("groups", dict(out_channels=6, kernel_size=3, padding="SAME", feature_group_count=2),
     (2, 6, 6, 4)),
    ("lenet5_c3", dict(out_channels=16, kernel_size=5,
                       connection_table=conv.lenet5_c3_table()), (2, 7, 6, 6)),
]


def random_problem(layer, input_shape, dtype, seed=0):
    """N(0, 1) params, x and dy for layer, all in dtype.

    Shapes come from `jax.eval_shape` of init and values from NumPy: compiling jax.random for
    every new shape would cost seconds per test on a small CPU.
    """
    traced = {}

    def init_params(key):
        traced["output_shape"], params = layer.init(key, input_shape)
        return params

    shapes = jax.eval_shape(init_params, jax.random.key(0))
    output_shape = traced["output_shape"]
    rng = np.random.default_rng(seed)

    def normal(shape):
        return jnp.asarray(rng.standard_normal(shape), dtype)

    params = jax.tree.map(lambda leaf: normal(leaf.shape), shapes)
    return params, normal(input_shape), normal((input_shape[0], *output_shape[1:]))


def vjp_reference(layer, params, x, dy):
    """(dparams, dx) from jax.vjp of layer.apply: the autodiff reference."""
    _, pullback = jax.vjp(layer.apply, params, x)
    return pullback(dy)


def forward_and_backward(layer, params, x, dy):
    """y and the hand-written (dparams, dx), compiled as one program (run op by op, each
    test compiled some hundred single operations)."""

    @jax.jit
    def run(params, x, dy):
        y, residuals = layer.forward(params, x)
        return y, layer.backward(params, residuals, dy)

    return run(params, x, dy)


def forward_backward_and_vjp(layer, params, x, dy):
    """y, the hand-written (dparams, dx) and jax.vjp's (dparams, dx), each compiled whole."""
    y, manual = forward_and_backward(layer, params, x, dy)
    return y, manual, jax.jit(lambda *args: vjp_reference(layer, *args))(params, x, dy)


@pytest.mark.parametrize("implementation", conv.IMPLEMENTATIONS)
@pytest.mark.parametrize("config", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_conv_backward_matches_vjp(config, implementation, dtype):
    name, kwargs, input_shape = config
    layer = conv.Conv2D(**kwargs, implementation=implementation, name=name)
    params, x, dy = random_problem(layer, input_shape, dtype)
    y, manual, reference = forward_backward_and_vjp(layer, params, x, dy)
    assert y.shape == dy.shape and y.dtype == jnp.dtype(dtype)
    assert_close_tree(manual, reference, dtype, name)
    assert float(jnp.linalg.norm(manual[1])) > 0 and float(jnp.linalg.norm(manual[0]["w"])) > 0


@pytest.mark.parametrize("implementation", conv.IMPLEMENTATIONS)
@pytest.mark.parametrize("config", [CONFIGS[1], CONFIGS[4]], ids=["same_stride2", "groups"])
@pytest.mark.standard_promotion
def test_x_of_another_dtype_than_the_params_is_promoted(config, implementation):
    """float32 params and a float64 x: every implementation computes in float64, as a jnp
    product of the two would ("conv" raised XLA's TypeError), and its backward matches jax.vjp
    of apply at the same mixed inputs within float32's tolerance (the params' rounding)."""
    name, kwargs, input_shape = config
    layer = conv.Conv2D(**kwargs, implementation=implementation, name=name)
    params, x, dy = random_problem(layer, input_shape, jnp.float64)
    params = jax.tree.map(lambda leaf: leaf.astype(jnp.float32), params)
    y, manual, reference = forward_backward_and_vjp(layer, params, x, dy)
    assert y.dtype == jnp.float64 and manual[1].dtype == jnp.float64
    assert_close_tree(y, layer.apply(jax.tree.map(lambda leaf: leaf.astype(jnp.float64), params),
                                     x), jnp.float32, name)
    assert_close_tree(manual, reference, jnp.float32, name)


def test_vjp_comparison_detects_an_unflipped_kernel():
    """The comparison above can fail: dx from the kernel without its spatial flip is far off."""
    layer = conv.Conv2D(3, 3, stride=2)
    params, x, dy = random_problem(layer, (2, 7, 7, 2), jnp.float64)
    _, reference_dx = vjp_reference(layer, params, x, dy)
    unflipped = conv.conv2d_backward_input(dy, params["w"][::-1, ::-1], (2, 2), (7, 7))
    assert relative_error(unflipped, reference_dx) > 0.1
    flipped = conv.conv2d_backward_input(dy, params["w"], (2, 2), (7, 7))
    assert relative_error(flipped, reference_dx) <= F64


def as_image(rows):
    """A (1, H, W, 1) float64 array from a nested list."""
    return jnp.asarray(rows, jnp.float64)[None, :, :, None]


def test_tiny_convolution_by_hand():
    """3x3 input, 2x2 kernel [[1, 2], [3, 4]], stride 1, bias 0.5, dy [[1, 0], [0, 2]].

    y[i, j] = x[i, j] + 2 x[i, j+1] + 3 x[i+1, j] + 4 x[i+1, j+1] + 0.5:
        y00 = 1 + 4 + 12 + 20 = 37, y01 = 2 + 6 + 15 + 24 = 47,
        y10 = 4 + 10 + 21 + 32 = 67, y11 = 5 + 12 + 24 + 36 = 77.
    dw[a, b] = x[a, b] dy00 + x[1+a, 1+b] dy11 = [[1 + 10, 2 + 12], [4 + 16, 5 + 18]];
    db = 3; dx[p, q] = w[p, q] dy00 + w[p-1, q-1] dy11 = [[1, 2, 0], [3, 4 + 2, 4], [0, 6, 8]].
    """
    layer = conv.Conv2D(1, 2)
    params = {"w": jnp.asarray([[1.0, 2.0], [3.0, 4.0]], jnp.float64)[:, :, None, None],
              "b": jnp.asarray([0.5], jnp.float64)}
    x = as_image([[1, 2, 3], [4, 5, 6], [7, 8, 9]])
    y, residuals = layer.forward(params, x)
    np.testing.assert_array_equal(y[0, :, :, 0], [[37.5, 47.5], [67.5, 77.5]])
    dparams, dx = layer.backward(params, residuals, as_image([[1, 0], [0, 2]]))
    np.testing.assert_array_equal(dparams["w"][:, :, 0, 0], [[11, 14], [20, 23]])
    np.testing.assert_array_equal(dparams["b"], [3])
    np.testing.assert_array_equal(dx[0, :, :, 0], [[1, 2, 0], [3, 6, 4], [0, 6, 8]])


def test_tiny_strided_convolution_with_minus_one_padding_by_hand():
    """x [[1, 2], [3, 4]] padded with -1 on top and left: [[-1, -1, -1], [-1, 1, 2], [-1, 3, 4]].

    Kernel [[1, 2], [3, 4]], stride 2: one output, y = -1 - 2 - 3 + 4 = -2 (the last padded row
    and column are seen by no window). With dy = 5: dw = 5 [[-1, -1], [-1, 1]], and dx is
    5 w[1, 1] = 20 at x[0, 0] and exactly 0 at the unused row and column.
    """
    layer = conv.Conv2D(1, 2, stride=2, padding=((1, 0), (1, 0)), pad_value=-1.0)
    params = {"w": jnp.asarray([[1.0, 2.0], [3.0, 4.0]], jnp.float64)[:, :, None, None],
              "b": jnp.zeros(1, jnp.float64)}
    y, residuals = layer.forward(params, as_image([[1, 2], [3, 4]]))
    np.testing.assert_array_equal(y, [[[[-2.0]]]])
    dparams, dx = layer.backward(params, residuals, as_image([[5]]))
    np.testing.assert_array_equal(dparams["w"][:, :, 0, 0], [[-5, -5], [-5, 5]])
    np.testing.assert_array_equal(dx[0, :, :, 0], [[20, 0], [0, 0]])


def numpy_conv_reference(x, w, b, stride, pads, pad_value, mask=None, groups=1):
    """y, and a function dy -> (dw, db, dx), by direct sums over each window (float64 NumPy)."""
    x, w, b = (np.asarray(a, np.float64) for a in (x, w, b))
    w = w if mask is None else w * mask[None, None]
    xp = np.pad(x, ((0, 0), *pads, (0, 0)), constant_values=pad_value)
    batch, hp, wp, channels = xp.shape
    kh, kw, c_g, out_channels = w.shape
    o_g = out_channels // groups
    out_h, out_w = (hp - kh) // stride[0] + 1, (wp - kw) // stride[1] + 1
    y = np.zeros((batch, out_h, out_w, out_channels))
    for i in range(out_h):
        for j in range(out_w):
            for o in range(out_channels):
                g = o // o_g
                window = xp[:, stride[0] * i:stride[0] * i + kh, stride[1] * j:stride[1] * j + kw,
                            g * c_g:(g + 1) * c_g]
                y[:, i, j, o] = np.sum(window * w[None, :, :, :, o], axis=(1, 2, 3))
    y += b if b.ndim == 3 else b[None, None, None, :]

    def backward(dy):
        dy = np.asarray(dy, np.float64)
        dw, dxp = np.zeros_like(w), np.zeros_like(xp)
        for i in range(out_h):
            for j in range(out_w):
                for o in range(out_channels):
                    g = o // o_g
                    rows = slice(stride[0] * i, stride[0] * i + kh)
                    cols = slice(stride[1] * j, stride[1] * j + kw)
                    chans = slice(g * c_g, (g + 1) * c_g)
                    weight = dy[:, i, j, o][:, None, None, None]
                    dw[:, :, :, o] += np.sum(weight * xp[:, rows, cols, chans], axis=0)
                    dxp[:, rows, cols, chans] += weight * w[None, :, :, :, o]
        if mask is not None:
            dw *= mask[None, None]
        db = dy.sum(axis=0) if b.ndim == 3 else dy.sum(axis=(0, 1, 2))
        (top, bottom), (left, right) = pads
        return dw, db, dxp[:, top:hp - bottom, left:wp - right]

    return y, backward


@pytest.mark.parametrize("implementation", conv.IMPLEMENTATIONS)
@pytest.mark.parametrize("variant", ["table_unshared", "groups"])
def test_conv_against_numpy_loops(variant, implementation):
    """Stride 2 with H + pads - k odd, padding with -1, and a connection table (or groups)."""
    rng = np.random.default_rng(3)
    if variant == "table_unshared":
        table = rng.random((4, 5)) < 0.5
        table[0] = True  # every output map sees at least one input
        kwargs = dict(connection_table=table, unshared_bias=True)
        extra = dict(mask=table)
    else:
        kwargs = dict(feature_group_count=2)
        extra = dict(groups=2)
    pads = ((2, 0), (1, 0))
    layer = conv.Conv2D(4 if variant == "groups" else 5, 3, stride=2, padding=pads,
                        pad_value=-1.0, implementation=implementation, **kwargs)
    params, x, dy = random_problem(layer, (2, 10, 11, 4), jnp.float64, seed=5)
    if variant == "table_unshared":  # masked entries nonzero: the mask must remove them
        assert np.all(params["w"][:, :, ~table] != 0)
    expected_y, numpy_backward = numpy_conv_reference(
        x, params["w"], params["b"], (2, 2), pads, -1.0, **extra)
    y, (dparams, dx) = forward_and_backward(layer, params, x, dy)
    assert y.shape == expected_y.shape == (2, 5, 5, params["b"].shape[-1])
    assert relative_error(y, expected_y) <= F64
    for name, got, want in zip(("dw", "db", "dx"), (dparams["w"], dparams["b"], dx),
                               numpy_backward(dy)):
        assert relative_error(got, want) <= F64, name
    # Padded size 12 by 12; the windows cover padded rows and columns 0..10, so the last input
    # row and column (padded index 11) get exactly no gradient.
    np.testing.assert_array_equal(dx[:, -1], 0)
    np.testing.assert_array_equal(dx[:, :, -1], 0)


@pytest.mark.parametrize("implementation", conv.IMPLEMENTATIONS)
def test_a_window_over_the_whole_input_is_a_dense_layer(implementation):
    """A kernel as large as its unpadded input (LeNet-5's C5), stride 2 (one window all the
    same), a connection table and unshared biases: y, the backward and the curvature against
    NumPy's loops in float64, by the Dense path whatever the implementation."""
    rng = np.random.default_rng(7)
    table = rng.random((4, 6)) < 0.5
    table[0] = True
    layer = conv.Conv2D(6, (4, 3), stride=2, connection_table=table, unshared_bias=True,
                        implementation=implementation)
    params, x, dy = random_problem(layer, (3, 4, 3, 4), jnp.float64, seed=8)
    assert layer.init(jax.random.key(0), (3, 4, 3, 4))[0] == (3, 1, 1, 6)
    expected_y, numpy_backward = numpy_conv_reference(
        x, params["w"], params["b"], (2, 2), ((0, 0), (0, 0)), 0.0, mask=table)
    y, (dparams, dx) = forward_and_backward(layer, params, x, dy)
    assert relative_error(y, expected_y) <= F64
    for name, got, want in zip(("dw", "db", "dx"), (dparams["w"], dparams["b"], dx),
                               numpy_backward(dy)):
        assert relative_error(got, want) <= F64, name
    _, residuals = layer.forward(params, x)
    _, numpy_curvature = numpy_conv_reference(x**2, params["w"] ** 2, params["b"], (2, 2),
                                              ((0, 0), (0, 0)), 0.0, mask=table)
    d2y = jnp.abs(dy)
    d2params, d2x = layer.curvature(params, residuals, d2y)
    for name, got, want in zip(("d2w", "d2b", "d2x"), (d2params["w"], d2params["b"], d2x),
                               numpy_curvature(d2y)):
        assert relative_error(got, want) <= F64, name


def test_same_padding_matches_xla_same():
    layer = conv.Conv2D(3, (4, 3), stride=(3, 2), padding="SAME")
    params, x, _ = random_problem(layer, (2, 10, 7, 2), jnp.float64)
    expected = jax.lax.conv_general_dilated(x, params["w"], (3, 2), "SAME",
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))
    y = layer.apply(params, x)
    assert y.shape == (2, 4, 4, 3)
    assert relative_error(y, expected + params["b"][None, None, None, :]) <= F64


def test_lenet5_c3_table_is_table_one():
    """Table I of LeCun et al. 1998, written column by column from the paper's text."""
    columns = [{o % 6, (o + 1) % 6, (o + 2) % 6} for o in range(6)]
    columns += [{(o + d) % 6 for d in range(4)} for o in range(6)]
    columns += [{0, 1, 3, 4}, {1, 2, 4, 5}, {0, 2, 3, 5}, set(range(6))]
    expected = np.array([[i in column for column in columns] for i in range(6)])
    table = conv.lenet5_c3_table()
    assert table.shape == (6, 16) and table.dtype == bool
    assert table.sum() == 60
    np.testing.assert_array_equal(table, expected)


def test_lenet1989_h2_table_has_eight_inputs_per_map():
    table = conv.lenet1989_h2_table()
    assert table.shape == (12, 12)
    np.testing.assert_array_equal(table.sum(axis=0), 8)
    np.testing.assert_array_equal(table.sum(axis=1), 8)
    np.testing.assert_array_equal(table[:, 0], np.arange(12) < 8)  # maps 0-3 see blocks 0, 1
    np.testing.assert_array_equal(table[:, 8], (np.arange(12) < 4) | (np.arange(12) >= 8))
    assert len({tuple(column) for column in table.T}) == 3  # three distinct input sets


def test_lenet1989_cyclic_h2_table_by_hand():
    """Map o sees H1 maps o..o+7 mod 12: map 0 sees 0-7, map 5 sees 5-11 and 0, map 11 sees
    11 and 0-6; twelve distinct input sets, each H1 map feeding 8 H2 maps."""
    table = conv.lenet1989_h2_table("cyclic")
    np.testing.assert_array_equal(np.flatnonzero(table[:, 0]), range(8))
    np.testing.assert_array_equal(np.flatnonzero(table[:, 5]), [0, 5, 6, 7, 8, 9, 10, 11])
    np.testing.assert_array_equal(np.flatnonzero(table[:, 11]), [0, 1, 2, 3, 4, 5, 6, 11])
    np.testing.assert_array_equal(table.sum(axis=1), 8)
    assert len({tuple(column) for column in table.T}) == 12
    with pytest.raises(ValueError, match=r"lenet1989_h2_table: scheme='random'; choose one of "
                                         r"\('blocks', 'cyclic'\)"):
        conv.lenet1989_h2_table("random")


def test_masked_weights_stay_exactly_zero():
    table = conv.lenet5_c3_table()
    layer = conv.Conv2D(16, 5, connection_table=table)
    params, x, dy = random_problem(layer, (2, 6, 6, 6), jnp.float64)
    masked = ~table[None, None] & np.ones((5, 5, 1, 1), bool)
    # Even with nonzero values there, the gradient of masked entries is exactly 0 ...
    dparams, _ = layer.backward(params, layer.forward(params, x)[1], dy)
    np.testing.assert_array_equal(dparams["w"][masked], 0)
    assert np.all(dparams["w"][~masked] != 0)
    # ... and they have no effect on y, whatever their value.
    zeroed = {**params, "w": jnp.where(masked, 0.0, params["w"])}
    np.testing.assert_array_equal(layer.apply(zeroed, x), layer.apply(params, x))
    # From init's zeros, a gradient step (with the L2 term (lambda/m) w) keeps them 0.
    stepped = zeroed["w"] - 0.1 * (dparams["w"] + 0.5 * zeroed["w"])
    np.testing.assert_array_equal(stepped[masked], 0)


def test_table_init_uses_each_maps_fan_in():
    """C3 maps 0-5 have fan-in 75, 6-14 have 100, 15 has 150 (LeCun et al. 1998)."""
    layer = conv.Conv2D(16, 5, connection_table=conv.lenet5_c3_table())
    _, params = layer.init(jax.random.key(0), (-1, 14, 14, 6))
    table = conv.lenet5_c3_table()
    np.testing.assert_array_equal(np.asarray(params["w"])[:, :, ~table], 0)
    assert np.all(np.asarray(params["w"])[:, :, table] != 0)
    largest = np.max(np.abs(np.asarray(params["w"])), axis=(0, 1, 2))
    fan_in = 25 * table.sum(axis=0)
    assert np.all(largest <= 2.4 / np.sqrt(fan_in))
    assert np.all(largest >= 0.8 * 2.4 / np.sqrt(fan_in))


def test_init_shapes_lenet1989_h1():
    """16x16 input padded by 2 with -1, 5x5 kernels, stride 2: 8x8x12 units, 768 biases."""
    layer = conv.Conv2D(12, 5, stride=2, padding=((2, 2), (2, 2)), pad_value=-1.0,
                        unshared_bias=True)
    output_shape, params = layer.init(jax.random.key(0), (-1, 16, 16, 1))
    assert output_shape == (-1, 8, 8, 12)
    assert params["w"].shape == (5, 5, 1, 12) and params["b"].shape == (8, 8, 12)
    grouped = conv.Conv2D(256, 5, padding="SAME", feature_group_count=2)
    assert grouped.init(jax.random.key(0), (-1, 27, 27, 96))[1]["w"].shape == (5, 5, 48, 256)


def test_forward_rejects_wrong_channels_naming_layer_and_shapes():
    layer = conv.Conv2D(4, 3, name="conv7")
    _, params = layer.init(jax.random.key(0), (-1, 8, 8, 3))
    with pytest.raises(ValueError, match=r"conv7: input x has shape \(2, 8, 8, 5\), expected "
                                         r"\(batch, height >= 3, width >= 3, 3\)"):
        layer.forward(params, jnp.zeros((2, 8, 8, 5)))
    with pytest.raises(ValueError, match=r"conv7: input x has shape \(8, 8, 3\)"):
        layer.forward(params, jnp.zeros((8, 8, 3)))
    with pytest.raises(ValueError, match=r"conv7: input x has shape \(1, 2, 8, 3\)"):
        layer.forward(params, jnp.zeros((1, 2, 8, 3)))


def test_unshared_bias_rejects_other_spatial_sizes():
    layer = conv.Conv2D(2, 5, stride=2, padding=((2, 2), (2, 2)), unshared_bias=True, name="H1")
    _, params = layer.init(jax.random.key(0), (-1, 16, 16, 1))
    fits = jnp.zeros((1, 15, 16, 1), jnp.float32)  # 15 rows give 8 outputs, as 16 do
    assert layer.apply(params, fits).shape == (1, 8, 8, 2)
    with pytest.raises(ValueError, match=r"H1: input x has shape \(1, 12, 16, 1\), expected "
                                         r"\(batch, 15..16, 15..16, 1\)"):
        layer.forward(params, jnp.zeros((1, 12, 16, 1), jnp.float32))
    # padding alone fits the kernel: only height 1 gives 3 rows ((n + 6 - 2) // 2 + 1), and
    # the message must not offer 2 (it said 1..2 when its range started from the clamped 1)
    padded = conv.Conv2D(2, 2, stride=2, padding=((3, 3), (0, 0)), unshared_bias=True, name="P")
    _, padded_params = padded.init(jax.random.key(0), (-1, 1, 4, 1))
    with pytest.raises(ValueError, match=r"P: input x has shape \(1, 2, 4, 1\), expected "
                                         r"\(batch, 1, 4..5, 1\)"):
        padded.forward(padded_params, jnp.zeros((1, 2, 4, 1), jnp.float32))


def test_init_rejects_bad_shapes_and_arguments():
    with pytest.raises(ValueError, match=r"big: input_shape \(-1, 4, 9, 1\), expected "
                                         r"\(batch, height >= 5, width >= 5, channels\)"):
        conv.Conv2D(2, 5, name="big").init(jax.random.key(0), (-1, 4, 9, 1))
    # Padding makes the same input large enough.
    assert conv.Conv2D(2, 5, padding=((1, 0), (0, 0))).init(
        jax.random.key(0), (-1, 4, 9, 1))[0] == (-1, 1, 5, 2)
    with pytest.raises(ValueError, match=r"c3: input_shape \(-1, 14, 14, 4\), expected "
                                         r"\(batch, height >= 5, width >= 5, 6\)"):
        conv.Conv2D(16, 5, connection_table=conv.lenet5_c3_table(), name="c3").init(
            jax.random.key(0), (-1, 14, 14, 4))
    with pytest.raises(ValueError, match="not divisible by feature_group_count 2"):
        conv.Conv2D(4, 3, feature_group_count=2).init(jax.random.key(0), (-1, 5, 5, 3))
    with pytest.raises(ValueError, match="padding"):
        conv.Conv2D(4, 3, padding="FULL")
    with pytest.raises(ValueError, match="connection_table has shape"):
        conv.Conv2D(4, 3, connection_table=np.ones((3, 5), bool))
    with pytest.raises(ValueError, match="not both"):
        conv.Conv2D(4, 3, feature_group_count=2, connection_table=np.ones((2, 4), bool))


@pytest.mark.parametrize("implementation", conv.IMPLEMENTATIONS)
def test_conv_curvature_against_numpy_loops(implementation):
    """The Gauss-Newton diagonal of a conv is its backward with x and w squared:
    d2w = sum of xp^2 d2y over windows, d2x = sum of w^2 d2y (the -1 border squares to 1)."""
    rng = np.random.default_rng(4)
    table = rng.random((3, 4)) < 0.6
    table[0] = True
    pads = ((2, 1), (1, 2))
    layer = conv.Conv2D(4, (3, 4), stride=(2, 3), padding=pads, pad_value=-1.0,
                        connection_table=table, unshared_bias=True,
                        implementation=implementation)
    params, x, d2y = random_problem(layer, (2, 9, 10, 3), jnp.float64, seed=6)
    d2y = jnp.abs(d2y)
    _, numpy_backward = numpy_conv_reference(x**2, params["w"] ** 2, params["b"], (2, 3), pads,
                                             1.0, mask=table)
    _, residuals = layer.forward(params, x)
    d2params, d2x = layer.curvature(params, residuals, d2y)
    for name, got, want in zip(("d2w", "d2b", "d2x"), (d2params["w"], d2params["b"], d2x),
                               numpy_backward(d2y)):
        assert relative_error(got, want) <= F64, name


@pytest.mark.parametrize("stride, kernel", [((1, 1), (5, 5)), ((2, 2), (5, 5)),
                                            ((3, 2), (2, 3)), ((2, 3), (4, 1))])
def test_patches_times_patch_kernel_is_the_convolution(stride, kernel):
    """The block-wise patches and the zero-padded kernel reproduce lax's strided convolution
    (groups of 2 included), so their geometry is right for every stride and kernel size."""
    rng = np.random.default_rng(7)
    xp = jnp.asarray(rng.standard_normal((2, 11, 10, 4)))
    w = jnp.asarray(rng.standard_normal((*kernel, 2, 6)))
    expected = jax.lax.conv_general_dilated(xp, w, stride, "VALID",
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                            feature_group_count=2)
    patches = conv.conv2d_patches(xp, kernel, stride, expected.shape[1:3])
    got = conv.conv2d_from_patches(patches, conv.conv2d_patch_kernel(w, stride), 2)
    assert relative_error(got, expected) <= F64


def test_band_matrix_by_hand():
    """A 1x2 kernel [[1, 2]] over a padded width of 5, stride 2: windows j = 0, 1 read
    columns 2j and 2j + 1, so T (5, 2) holds the kernel's two taps down each column from
    row 2j, zeros elsewhere; the last column (q = 4) is read by no window."""
    w = jnp.asarray([[1.0, 2.0]], jnp.float64)[:, :, None, None]
    band = conv.conv2d_band_matrix(w, in_width=5, stride_width=2, out_width=2)
    np.testing.assert_array_equal(band, [[1, 0], [2, 0], [0, 1], [0, 2], [0, 0]])


@pytest.mark.parametrize("stride, kernel, groups", [((1, 1), (5, 5), 1), ((2, 2), (5, 5), 2),
                                                    ((3, 2), (2, 3), 1), ((2, 3), (4, 1), 2)])
def test_tiles_times_band_matrix_is_the_convolution(stride, kernel, groups):
    """The input of each tile times the banded kernel over the tile's span reproduce lax's
    strided (grouped) convolution, for whole rows, single windows and every tile width
    between that divides the output width."""
    rng = np.random.default_rng(8)
    xp = jnp.asarray(rng.standard_normal((2, 11, 14, 4)))
    w = jnp.asarray(rng.standard_normal((*kernel, 4 // groups, 6)))
    expected = jax.lax.conv_general_dilated(xp, w, stride, "VALID",
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                            feature_group_count=groups)
    (out_h, out_w) = expected.shape[1:3]
    widths = [tile for tile in range(1, out_w + 1) if out_w % tile == 0]
    assert len(widths) >= 2
    for tile in widths:
        span = stride[1] * (tile - 1) + kernel[1]
        tiles = conv.conv2d_tiles(xp, kernel, stride, (out_h, out_w), tile)
        assert tiles.shape == (2 * out_h * out_w // tile, kernel[0] * span * 4)
        band = conv.conv2d_band_matrix(w, span, stride[1], tile, groups)
        assert relative_error((tiles @ band).reshape(expected.shape), expected) <= F64, tile


def test_tiles_by_hand():
    """Input columns 0..7 and a 1x2 kernel at stride 2 give 4 outputs a row; a tile of 2 of
    them spans 2 (2 - 1) + 2 = 4 columns, and tile u starts at column 2 * 2u."""
    xp = jnp.arange(8.0).reshape(1, 1, 8, 1)
    tiles = conv.conv2d_tiles(xp, (1, 2), (1, 2), (1, 4), 2)
    np.testing.assert_array_equal(tiles, [[0, 1, 2, 3], [4, 5, 6, 7]])


@pytest.mark.parametrize("out_width, kernel_width, stride_width, expected", [
    (28, 5, 1, 4),  # LeNet-5's C1: spans of 7 - 1 + 5 = 11 > 2 * 5 columns; 4 + 4 = 8 <= 10
    (10, 5, 1, 5),  # C3: span 9
    (8, 5, 2, 2),  # LeNet-1989's H1: 2 (4 - 1) + 5 = 11 > 10
    (1, 5, 1, 1), (13, 3, 1, 1), (12, 3, 1, 4), (55, 11, 4, 1), (6, 1, 1, 2)])
def test_tile_width_is_the_widest_dividing_tile_within_the_span(out_width, kernel_width,
                                                                stride_width, expected):
    assert conv.TILE_MAX_SPAN == 2
    assert conv.tile_width(out_width, kernel_width, stride_width) == expected


@pytest.mark.parametrize("shape, width, fold", [
    ((3, 5, 28, 6), 24, 4),  # LeNet-5's C1 maps: 4 columns of 6 channels
    ((3, 4, 14, 6), 24, 2),  # S2's: 14 has no divisor 3 or 4
    ((2, 3, 10, 16), 24, 1),  # C3's: 2 x 16 > 24
    ((2, 3, 7, 30), 24, 1),  # more channels than the width
    ((2, 3, 12, 2), 24, 12),  # whole rows
    ((2, 3, 12, 2), 1, 1),  # no fold at all
])
def test_channel_sum_folds_columns_and_sums_every_channel(shape, width, fold, monkeypatch):
    """channel_sum against NumPy's sum over (n, i, j); the fold it takes, read off the
    reshape it makes (the sums are equal whatever the fold)."""
    monkeypatch.setattr(conv, "CHANNEL_SUM_WIDTH", width)
    x = np.random.default_rng(3).standard_normal(shape)
    assert relative_error(conv.channel_sum(jnp.asarray(x)), x.sum(axis=(0, 1, 2))) <= F64
    # a new function each time: make_jaxpr caches traces per function, and the width is
    # read while tracing
    jaxpr = jax.make_jaxpr(lambda values: conv.channel_sum(values))(jnp.asarray(x))
    reshapes = [e.outvars[0].aval.shape for e in jaxpr.eqns if e.primitive.name == "reshape"]
    assert reshapes[0] == (x.size // (fold * shape[-1]), fold * shape[-1])


@pytest.mark.parametrize("max_span", [1, 1.5])
@pytest.mark.parametrize("config", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_tiles_of_every_width_match_conv_and_vjp(config, max_span, monkeypatch):
    """One window a tile (TILE_MAX_SPAN 1) and tiles narrower than the default's (1.5; the
    default 2 is in the tests over IMPLEMENTATIONS, and whole rows are "rows", the same code
    with one tile a row): "tiles" matches lax's convolution and jax.vjp in float64."""
    monkeypatch.setattr(conv, "TILE_MAX_SPAN", max_span)
    name, kwargs, input_shape = config
    assert_matches_conv_and_vjp("tiles", name, kwargs, input_shape)


def test_rows_refuses_a_band_matrix_too_large(monkeypatch):
    """AlexNet's conv1 as "rows" would need 11 * 227 * 3 * 55 * 96 = 39,552,480 band entries;
    the layer names itself, the size and the limit instead of allocating them."""
    layer = conv.Conv2D(96, 11, stride=4, implementation="rows", name="conv1")
    params = jax.eval_shape(lambda: layer.init(jax.random.key(0), (1, 227, 227, 3))[1])
    with pytest.raises(ValueError, match=r"conv1: implementation 'rows' needs a band matrix "
                                         r"of 39552480 entries \(227 input columns to 55 "
                                         r"output columns\), more than ROWS_BAND_MAX_SIZE"):
        jax.eval_shape(layer.apply, params, jax.ShapeDtypeStruct((1, 227, 227, 3), jnp.float32))
    monkeypatch.setattr(conv, "ROWS_BAND_MAX_SIZE", 2**26)
    y = jax.eval_shape(layer.apply, params, jax.ShapeDtypeStruct((1, 227, 227, 3), jnp.float32))
    assert y.shape == (1, 55, 55, 96)


def assert_matches_conv_and_vjp(implementation, name, kwargs, input_shape):
    """y of `implementation` against the "conv" layer's (lax's convolution), and its
    hand-written backward against jax.vjp, both in float64."""
    layer = conv.Conv2D(**kwargs, implementation=implementation, name=name)
    params, x, dy = random_problem(layer, input_shape, jnp.float64)
    y, manual, reference = forward_backward_and_vjp(layer, params, x, dy)
    expected_y = jax.jit(conv.Conv2D(**kwargs, implementation="conv", name=name).apply)(
        params, x)
    assert relative_error(y, expected_y) <= F64
    assert_close_tree(manual, reference, jnp.float64, name)


@pytest.mark.parametrize("min_size", [0, 2**40], ids=["col2im_in_place", "col2im_sum_of_pads"])
@pytest.mark.parametrize("name, kwargs, input_shape", [
    CONFIGS[3], CONFIGS[4], CONFIGS[5],
    ("one_by_one_output", dict(out_channels=3, kernel_size=5), (2, 5, 5, 4)),
], ids=lambda v: v if isinstance(v, str) else "")
def test_patches_backward_either_col2im(name, kwargs, input_shape, min_size, monkeypatch):
    """Both ways "patches" adds the input gradient back (in place per kernel offset, or one
    sum of padded copies; COL2IM_IN_PLACE_MIN_SIZE picks), match jax.vjp in float64, and y
    (from the transposed product, or the plain one for a 1x1 output) lax's convolution."""
    monkeypatch.setattr(conv, "COL2IM_IN_PLACE_MIN_SIZE", min_size)
    assert_matches_conv_and_vjp("patches", name, kwargs, input_shape)


def test_unknown_implementation_is_named():
    with pytest.raises(ValueError, match=r"H1: implementation must be one of .*'im2col'"):
        conv.Conv2D(4, 3, implementation="im2col", name="H1")


@pytest.mark.parametrize("max_size", [0, 2**40], ids=["y_by_xla_conv", "y_by_patches"])
def test_patches_forward_takes_either_product(max_size, monkeypatch):
    """Above PATCH_PRODUCT_MAX_SIZE the "patches" layer takes y from XLA's convolution and
    keeps the patches for backward only; below it, from the patches. Both match jax.vjp."""
    monkeypatch.setattr(conv, "PATCH_PRODUCT_MAX_SIZE", max_size)
    name, kwargs, input_shape = CONFIGS[3]  # LeNet-1989's H1: stride 2, -1 padding, unshared
    layer = conv.Conv2D(**kwargs, implementation="patches", name=name)
    params, x, dy = random_problem(layer, input_shape, jnp.float64)
    y, manual, reference = forward_backward_and_vjp(layer, params, x, dy)
    expected_y = jax.lax.conv_general_dilated(
        jnp.pad(x, ((0, 0), (2, 2), (2, 2), (0, 0)), constant_values=-1.0), params["w"],
        (2, 2), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")) + params["b"][None]
    assert relative_error(y, expected_y) <= F64
    assert_close_tree(manual, reference, jnp.float64, name)


@pytest.mark.parametrize("implementation", ["rows", "tiles"])
@pytest.mark.parametrize("max_size", [0, 2**40], ids=["y_by_xla_conv", "y_by_rows"])
@pytest.mark.parametrize("config", [CONFIGS[3], CONFIGS[5]], ids=lambda c: c[0])
def test_rows_forward_takes_either_product(config, max_size, implementation, monkeypatch):
    """Above PATCH_PRODUCT_MAX_SIZE entries of its rows (or tiles) the layer takes y from
    XLA's convolution and keeps them for backward only (E over a whole data set); below it,
    from the band product. Both match lax's convolution and jax.vjp in float64."""
    monkeypatch.setattr(conv, "PATCH_PRODUCT_MAX_SIZE", max_size)
    monkeypatch.setattr(conv, "TILE_MAX_SPAN", 1)  # "tiles" of one window each
    name, kwargs, input_shape = config
    assert_matches_conv_and_vjp(implementation, name, kwargs, input_shape)


def test_window_index_by_hand():
    """A 2x3 input padded by one row on top and one column on the left, 2x2 kernel, stride
    (1, 2): windows (0, 0) and (0, 1) on the padded row, (1, 0) and (1, 1) below it.

    Padded map (B = border, digits = flat positions of x):
        B B B B
        B 0 1 2
        B 3 4 5
    out_h = (3 - 2) // 1 + 1 = 2, out_w = (4 - 2) // 2 + 1 = 2; the border is slot 6. Entries
    of (windows, taps) are numbered window * 4 + tap, the taps in the order (0,0), (0,1),
    (1,0), (1,1).
    """
    index, uses = conv.window_index([2, 3], [[1, 0], [1, 0]], (2, 2), np.array([1, 2]))
    np.testing.assert_array_equal(index, [[6, 6, 6, 0], [6, 6, 1, 2],
                                          [6, 0, 6, 3], [1, 2, 4, 5]])
    # position 0 is read by entries 3 (window 0, tap 3) and 9 (window 2, tap 1); 16 = zero slot
    np.testing.assert_array_equal(uses, [[3, 9], [6, 12], [7, 13], [11, 16],
                                         [14, 16], [15, 16]])


@pytest.mark.parametrize("dx_by_gather", [False, True], ids=["dx_scatter", "dx_gather_sum"])
@pytest.mark.parametrize("dw_transposed", [False, True], ids=["dw_plain", "dw_transposed"])
@pytest.mark.parametrize("y_by_patches", [False, True], ids=["y_by_xla_conv", "y_by_patches"])
@pytest.mark.parametrize("config", [CONFIGS[1], CONFIGS[2], CONFIGS[3], CONFIGS[4], CONFIGS[5]],
                         ids=lambda c: c[0])
def test_gather_takes_every_path(config, y_by_patches, dw_transposed, dx_by_gather,
                                 monkeypatch):
    """Every way "gather" computes y (the product, or XLA's convolution above
    PATCH_PRODUCT_MAX_SIZE), dw (with the transposed patches copied out, or not) and dx (one
    scatter-add, or a sum of gathers) matches lax's convolution and jax.vjp in float64."""
    monkeypatch.setattr(conv, "PATCH_PRODUCT_MAX_SIZE", 2**40 if y_by_patches else 0)
    monkeypatch.setattr(conv, "TRANSPOSED_PATCHES_MAX_SIZE", 2**40 if dw_transposed else 0)
    monkeypatch.setattr(conv, "GATHER_INPUT_GRADIENT_MIN_SIZE", 0 if dx_by_gather else 2**40)
    name, kwargs, input_shape = config
    assert_matches_conv_and_vjp("gather", name, kwargs, input_shape)


@pytest.mark.parametrize("pad_value", [0.0, -1.0, 2.5])
@pytest.mark.parametrize("groups", [1, 2])
def test_constant_padding_by_linearity(pad_value, groups):
    """conv(pad_c(x)) computed as conv with zero padding plus c times the border's own
    convolution equals lax's convolution of the explicitly padded input."""
    rng = np.random.default_rng(11)
    x = jnp.asarray(rng.standard_normal((3, 9, 8, 4)))
    w = jnp.asarray(rng.standard_normal((3, 4, 4 // groups, 6)))
    pads = ((2, 1), (0, 3))
    expected = jax.lax.conv_general_dilated(
        jnp.pad(x, ((0, 0), *pads, (0, 0)), constant_values=pad_value), w, (2, 3), "VALID",
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups)
    got = conv.conv2d_constant_padded(x, w, pads, pad_value, (2, 3), groups)
    assert got.shape == expected.shape
    assert relative_error(got, expected) <= F64


def test_unshared_bias_with_same_padding_names_the_input_sizes_that_fit():
    """With 'SAME' padding, out = ceil(n / stride): 15 and 16 rows both give 8 at stride 2."""
    layer = conv.Conv2D(2, 3, stride=2, padding="SAME", unshared_bias=True, name="S")
    _, params = layer.init(jax.random.key(0), (-1, 16, 16, 1))
    assert layer.apply(params, jnp.zeros((1, 15, 16, 1), jnp.float32)).shape == (1, 8, 8, 2)
    with pytest.raises(ValueError, match=r"S: input x has shape \(1, 12, 16, 1\), expected "
                                         r"\(batch, 15..16, 15..16, 1\)"):
        layer.forward(params, jnp.zeros((1, 12, 16, 1), jnp.float32))


@pytest.mark.parametrize("arguments, message", [
    ({"kernel_size": 0}, r"kernel_size must be a positive int or pair, got 0"),
    ({"kernel_size": (3,)}, r"kernel_size must be a positive int or pair, got \(3,\)"),
    ({"kernel_size": None}, r"kernel_size must be a positive int or pair, got None"),
    ({"stride": (1, 0)}, r"stride must be a positive int or pair, got \(1, 0\)"),
    ({"padding": ((1, -1), (0, 0))}, r"padding \(\(1, -1\), \(0, 0\)\); use 'VALID', 'SAME' "
                                     r"or .* with non-negative ints"),
    ({"padding": 3}, r"padding 3; use 'VALID', 'SAME'"),
    ({"out_channels": 0}, r"out_channels must be an int >= 1, got 0"),
    ({"out_channels": 2.5}, r"out_channels must be an int >= 1, got 2.5"),
    ({"stride": True}, r"stride must be a positive int or pair, got True"),
    ({"kernel_size": (3, 2.0)}, r"kernel_size must be a positive int or pair"),
    # int() would have read these as ((1, 0), (0, 0)), silently
    ({"padding": ((1.7, 0.2), (0, 0))}, r"padding \(\(1.7, 0.2\), \(0, 0\)\); use"),
    ({"padding": (("1", "0"), (0, 0))}, r"padding \(\('1', '0'\), \(0, 0\)\); use"),
    ({"feature_group_count": 2.5}, r"feature_group_count 2.5 must be >= 1 and divide "),
    ({"feature_group_count": 3}, r"feature_group_count 3 must be >= 1 and divide "
                                 r"out_channels 4"),
    ({"connection_table": np.full((2, 4), 2)}, r"connection_table must hold only 0/1"),
    ({"connection_table": np.eye(2, 4)}, r"every output map must see at least one input "
                                         r"map; columns \[2, 3\] are empty"),
])
def test_bad_arguments_are_refused_by_name(arguments, message):
    arguments = {"out_channels": 4, "kernel_size": 3, **arguments}
    with pytest.raises(ValueError, match="C: " + message):
        conv.Conv2D(name="C", **arguments)


@pytest.mark.parametrize("stride, kernel, groups", [((1, 1), (3, 3), 2), ((2, 3), (4, 2), 3),
                                                    ((3, 3), (5, 5), 1)])
def test_group_by_group_products_are_lax_grouped_convolution_and_its_vjp(stride, kernel,
                                                                         groups):
    """y of the "conv" layer, dw and dx, each computed one group at a time, against lax's
    grouped convolution (feature_group_count) and jax.vjp of it, float64."""
    rng = np.random.default_rng(12)
    xp = jnp.asarray(rng.standard_normal((2, 13, 11, 6)))
    w = jnp.asarray(rng.standard_normal((*kernel, 6 // groups, 6)))

    def grouped(xp, w):
        return jax.lax.conv_general_dilated(xp, w, stride, "VALID",
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                            feature_group_count=groups)

    y, pullback = jax.vjp(grouped, xp, w)
    dy = jnp.asarray(rng.standard_normal(y.shape))
    expected_dxp, expected_dw = pullback(dy)
    layer = conv.Conv2D(6, kernel, stride=stride, feature_group_count=groups)
    assert relative_error(layer.apply({"w": w, "b": jnp.zeros(6)}, xp), y) <= F64
    assert relative_error(conv.conv2d_backward_kernel(xp, dy, kernel, stride, groups),
                          expected_dw) <= F64
    assert relative_error(conv.conv2d_backward_input(dy, w, stride, xp.shape[1:3], groups),
                          expected_dxp) <= F64


def test_rows_keeps_whole_rows_and_tiles_its_tiles():
    """What each implementation keeps for backward says how it cut the rows: LeNet-5's C1
    (28 outputs a row, 5x5) as "rows" keeps one (5 kh x 32 columns) input block per output
    row, as "tiles" one (5 x 8) block per tile of tile_width(28, 5, 1) = 4 outputs."""
    x = jnp.zeros((2, 32, 32, 1), jnp.float32)
    for implementation, blocks, span in (("rows", 2 * 28, 32), ("tiles", 2 * 28 * 7, 4 + 4)):
        layer = conv.Conv2D(6, 5, implementation=implementation)
        params = layer.init(jax.random.key(0), x.shape)[1]
        _, (_, saved) = layer.forward(params, x)
        assert saved.shape == (blocks, 5 * span * 1), implementation
