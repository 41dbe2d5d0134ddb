"""nets.accounting: the papers' counts for LeNet 1989 and LeNet-5, AlexNet's exact figures, and
the rules checked against the parameters that init actually makes."""
import jax
import numpy as np
import pytest

from nets import accounting, conv, models, pooling
from nets.layers import Dense, Layer, serial

# LeCun et al. 1989, Section 3: (units, free parameters, connections) per layer.
LENET1989 = {"H1": (768, 1_068, 19_968), "H2": (192, 2_592, 38_592), "H3": (30, 5_790, 5_790),
             "output": (10, 310, 310)}
# LeCun et al. 1998, Section II.B: (trainable parameters, connections) per layer; the output
# is our Dense layer (the paper's RBF has 840 connections and no trainable parameters).
LENET5 = {"C1": (156, 122_304), "S2": (12, 5_880), "C3": (1_516, 151_600), "S4": (32, 2_000),
          "C5": (48_120, 48_120), "F6": (10_164, 10_164), "output": (850, 850)}
# Our AlexNet, 227x227 input: (neurons, params, connections, multiply-adds), documented in
# nets/models.py and experiments/seed_table.py.
ALEXNET = {2: (659_272, 60_965_224, 725_066_088, 724_406_816),
           1: (659_272, 62_378_344, 1_135_915_368, 1_135_256_096)}


@pytest.fixture(scope="module")
def lenet1989():
    return accounting.count(models.lenet1989(), models.LENET1989_INPUT_SHAPE)


@pytest.fixture(scope="module")
def lenet5():
    return accounting.count(models.lenet5(), models.LENET5_INPUT_SHAPE)


def test_lenet1989_per_layer(lenet1989):
    assert [row.name for row in lenet1989.layers] == ["input", "H1", "H2", "H3", "output"]
    for name, (units, params, connections) in LENET1989.items():
        row = lenet1989.layer(name)
        assert (row.units, row.params, row.connections) == (units, params, connections), name
        # Multiply-adds: the connections without one bias per unit.
        assert row.macs == connections - units, name
    assert lenet1989.layer("input").units == 256


def test_lenet1989_totals(lenet1989):
    assert lenet1989.totals() == {"inputs": 256, "neurons": 1_000, "units": 1_256,
                                  "params": 9_760, "connections": 64_660, "macs": 63_660}


def test_lenet1989_counts_do_not_depend_on_the_activation_or_batch(lenet1989):
    scaled = accounting.count(models.lenet1989(scaled_tanh=True), (7, 16, 16, 1))
    assert scaled.totals() == lenet1989.totals()


def test_lenet5_per_layer_and_totals(lenet5):
    assert [row.name for row in lenet5.layers] == [
        "input", "C1", "S2", "C3", "S4", "C5", "F6", "output"]
    for name, (params, connections) in LENET5.items():
        row = lenet5.layer(name)
        assert (row.params, row.connections) == (params, connections), name
    assert lenet5.params == 60_850 and lenet5.connections == 340_918
    # The paper's totals: its 60,000 is exact for C1..F6 (its RBF centres are not trained),
    # and 340,908 has the RBF's 84 x 10 connections where our Dense has 850.
    assert lenet5.params - lenet5.layer("output").params == 60_000
    assert lenet5.connections - 850 + 84 * 10 == 340_908
    assert (lenet5.inputs, lenet5.neurons, lenet5.units) == (1_024, 8_094, 9_118)
    assert lenet5.neurons - lenet5.layer("output").units == 8_084  # C1 to F6
    assert lenet5.macs == 332_824


def test_lenet5_with_the_papers_rbf_output_has_its_exact_totals():
    """With the RBF output (fixed centres: connections, no parameters) the model's own count
    is the paper's 60,000 parameters and 340,908 connections, with no correction."""
    counted = accounting.count(models.lenet5(output="rbf"), models.LENET5_INPUT_SHAPE)
    for name, (params, connections) in {**LENET5, "output": (0, 840)}.items():
        row = counted.layer(name)
        assert (row.params, row.connections) == (params, connections), name
    assert (counted.params, counted.connections) == (60_000, 340_908)
    assert counted.layer("output").units == 10 and counted.layer("output").macs == 840


@pytest.mark.parametrize("towers", [2, 1])
def test_alexnet_totals(towers):
    counted = accounting.count(models.alexnet(towers=towers), models.ALEXNET_INPUT_SHAPE)
    neurons, params, connections, macs = ALEXNET[towers]
    assert (counted.neurons, counted.params, counted.connections, counted.macs) == (
        neurons, params, connections, macs)
    assert counted.inputs == 227 * 227 * 3
    assert abs(counted.neurons / 650_000 - 1) < 0.05
    if towers == 2:
        assert abs(counted.params / 60e6 - 1) < 0.05
    assert counted.layer("conv1").output_shape == (-1, 55, 55, 96)
    assert counted.layer("conv1").units == 290_400
    # The paper's Section 3.5 list differs from ours only in conv1 (253,440).
    paper = (253_440, 186_624, 64_896, 64_896, 43_264, 4096, 4096, 1000)
    ours = [row.units for row in counted.layers[1:]]
    assert [a == b for a, b in zip(ours, paper)] == [False] + [True] * 7


def test_alexnet_per_layer_parameters():
    counted = accounting.count(models.alexnet(), models.ALEXNET_INPUT_SHAPE)
    expected = {"conv1": 11 * 11 * 3 * 96 + 96, "conv2": 5 * 5 * 48 * 256 + 256,
                "conv3": 3 * 3 * 256 * 384 + 384, "conv4": 3 * 3 * 192 * 384 + 384,
                "conv5": 3 * 3 * 192 * 256 + 256, "fc6": 6 * 6 * 256 * 4096 + 4096,
                "fc7": 4096 * 4096 + 4096, "output": 4096 * 1000 + 1000}
    assert {row.name: row.params for row in counted.layers[1:]} == expected


@pytest.mark.parametrize("build, input_shape", [
    (models.lenet1989_modern, models.LENET1989_INPUT_SHAPE),
    (lambda: models.alexnet(towers=2), models.ALEXNET_INPUT_SHAPE),
    (lambda: models.alexnet(towers=1, num_classes=10), (-1, 99, 99, 3)),
], ids=["lenet1989_modern", "alexnet2", "alexnet1_99"])
def test_params_equal_the_parameters_init_makes_without_tables(build, input_shape):
    """Without connection tables every parameter entry is free: the count equals the sizes of
    the leaves init makes (shapes only, via jax.eval_shape)."""
    model = build()
    shapes = jax.eval_shape(lambda key: model.init(key, input_shape)[1], jax.random.key(0))
    assert accounting.count(model, input_shape).params == sum(
        leaf.size for leaf in jax.tree.leaves(shapes))


def test_table_params_equal_the_nonzero_kernel_entries_init_makes():
    """With a table, free parameters are the kernel entries init leaves nonzero plus biases."""
    layer = conv.Conv2D(16, 5, connection_table=conv.lenet5_c3_table(), name="C3")
    _, params = layer.init(jax.random.key(0), (-1, 14, 14, 6))
    row = accounting.count(serial(layer), (-1, 14, 14, 6)).layer("C3")
    assert row.params == int(np.count_nonzero(np.asarray(params["w"]))) + params["b"].size
    assert row.params == 60 * 25 + 16


def test_unshared_bias_and_groups_rules():
    """One bias per unit; grouped kernels see C / G input maps."""
    model = serial(conv.Conv2D(6, 3, stride=2, padding="SAME", unshared_bias=True,
                               feature_group_count=3, name="grouped"))
    row = accounting.count(model, (-1, 9, 9, 12)).layer("grouped")
    units = 5 * 5 * 6
    assert row.units == units
    assert row.params == 3 * 3 * 4 * 6 + units
    assert row.macs == units * 3 * 3 * 4 and row.connections == row.macs + units


def test_subsampling_rule_reads_the_window():
    model = serial(pooling.Subsampling((3, 2), name="S"))
    row = accounting.count(model, (-1, 7, 6, 4)).layer("S")
    assert row.output_shape == (-1, 2, 3, 4)
    assert (row.units, row.params, row.macs) == (24, 8, 24 * 6)
    assert row.connections == 24 * 7


def test_channel_groups_are_counted_group_by_group():
    model = serial(models.channel_groups(Dense(3, name="dense"), 2, name="towers"))
    counted = accounting.count(model, (-1, 8))
    assert [row.name for row in counted.layers] == ["input", "dense[0]", "dense[1]"]
    assert (counted.neurons, counted.params, counted.connections) == (6, 30, 30)


def test_parameter_free_layers_add_nothing():
    counted = accounting.count(serial(pooling.MaxPool(2), pooling.Flatten(), name="free"),
                               (-1, 4, 4, 2))
    assert counted.totals() == {"inputs": 32, "neurons": 0, "units": 32, "params": 0,
                                "connections": 0, "macs": 0}


def test_unknown_kinds_with_parameters_raise_and_can_be_registered():
    def Scale(name="scale"):
        def init(key, input_shape):
            return tuple(input_shape), {"w": jax.numpy.ones(input_shape[1:])}

        def forward(params, x):
            return x * params["w"], x

        def backward(params, x, dy):
            return {"w": (dy * x).sum(0)}, dy * params["w"]

        return Layer(name, init, forward, backward)

    model = serial(Scale(), name="scaled")
    kind = accounting.layer_kind(model.sublayers[0])
    assert kind == "Scale"
    with pytest.raises(ValueError, match="no counting rule"):
        accounting.count(model, (-1, 5))
    accounting.register_rule(kind, lambda layer, i, o, p: (5, 5, 5, 5))
    try:
        assert accounting.count(model, (-1, 5)).params == 5
    finally:
        del accounting.RULES[kind]


def test_as_dict_is_json_ready(lenet1989):
    document = lenet1989.as_dict()
    assert document["params"] == 9_760 and document["input_shape"] == [-1, 16, 16, 1]
    assert document["layers"][1] == {"name": "H1", "kind": "Conv2D",
                                     "output_shape": [-1, 8, 8, 12], "units": 768,
                                     "params": 1_068, "connections": 19_968, "macs": 19_200}
    with pytest.raises(KeyError, match="H4"):
        lenet1989.layer("H4")


@pytest.mark.parametrize("kind, gates, peepholes, extra_biases", [
    ("elman_tanh", 1, 0, 0), ("lstm", 4, 0, 0), ("lstm_peephole", 4, 3, 0), ("gru", 3, 0, 0),
    ("gru_reset_after", 3, 0, 1)])
def test_recurrent_layers_count_every_step(kind, gates, peepholes, extra_biases):
    """F = 3 inputs, H = 4 units, T = 5 steps, by hand: per step G H sums of F + H weights and
    a bias, plus 3 H peephole weights (LSTM with peepholes) or H more biases (the reset-after
    GRU's b_hn); the weights are shared across steps, so params count them once and
    connections once per step."""
    from nets import recurrent

    layer = recurrent.rnn(recurrent.make_cell(kind, 4))
    (row,) = accounting.count(serial(layer), (-1, 5, 3)).layers[1:]
    weights = gates * 4 * (3 + 4) + peepholes * 4
    biases = (gates + extra_biases) * 4
    assert (row.kind, row.units, row.params) == ("rnn", 5 * gates * 4, weights + biases)
    assert (row.connections, row.macs) == (5 * (weights + biases), 5 * weights)


def test_dropout_after_counts_as_the_layer_it_wraps():
    """A Dense(3) on 4 inputs, by hand: 3 units, 4 x 3 + 3 = 15 params, 15 connections, 12
    multiply-adds, with or without dropout on its output; a recurrent stack with dropout
    between its layers counts as the same stack without."""
    from nets import recurrent

    wrapped = accounting.count(serial(pooling.dropout_after(Dense(3, name="d"), 0.5)), (1, 4))
    assert [(row.name, row.units, row.params, row.connections, row.macs)
            for row in wrapped.layers[1:]] == [("d", 3, 15, 15, 12)]
    stacks = [accounting.count(recurrent.sequence_model([recurrent.lstm(8), recurrent.lstm(8)],
                                                        5, dropout=rate), (1, 6, 5))
              for rate in (0.0, 0.5)]
    assert [stack.params for stack in stacks] == [stacks[0].params] * 2
    assert stacks[0].params == 4 * (5 + 8 + 1) * 8 + 4 * (8 + 8 + 1) * 8 + 8 * 5 + 5


@pytest.mark.parametrize("input_shape", [(1, 5.7), (1, True), "15", 5, ()])
def test_count_refuses_an_input_shape_of_sizes_that_are_not_whole_numbers(input_shape):
    """int() read a size of 5.7 as 5 and True as 1, counting another net than the one meant,
    and the str "15" as the shape (1, 5); an int alone was a raw TypeError."""
    model = serial(Dense(4, name="hidden"), Dense(3, name="output"), name="net")
    assert accounting.count(model, (-1, np.int64(5))).params == 5 * 4 + 4 + 4 * 3 + 3
    with pytest.raises(ValueError, match=r"accounting: net: input_shape must be \(batch, \.\.\.\) "
                                         r"of whole numbers, got"):
        accounting.count(model, input_shape)
