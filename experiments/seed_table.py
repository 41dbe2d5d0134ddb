"""The lecture's table of three seed nets, LeNet 1989, LeNet 1998 and AlexNet 2012, recomputed.

    python -m experiments.seed_table [--workdir DIR] [--scaled-tanh] [--towers 2]

For each net, three columns: the value on the lecture's slide, the value in the paper, and the
value `nets.accounting` computes from our definition in `nets.models` (units, parameters,
connections, multiply-adds, classes, input size; task and training-set size are facts about
the data, not the model, so that column shows "-" for them). Rows: task, classes, image size,
examples (training-set sizes from the papers), units, parameters, connections, activation,
operations (multiply-adds per example). Every difference is explained in the notes printed
below the table, then each model's per-layer breakdown.

The slide's values, as the lecture gives them. LeNet-1989: digits, 10 classes, 16x16, 7,291
examples, 1,256 units, 9,760 parameters, 65k connections, tanh. LeNet-1998: 10 classes, 32x32
(28x28 digits padded), 60,000 examples; the slide did not give (or we could not confirm) its
task, units, parameters, connections and activation: "n/a". AlexNet: ImageNet, 1000 classes,
224x224, 1.2M examples, 650k units, 60M parameters, 630M connections, ReLU. No slide gives
operations.

Writes DIR/results.json (the README's keys, plus "models": {name: {inputs, neurons, units, params,
connections, macs, input_shape, layers: [per-layer rows]}}, "table": the comparison rows,
"notes"), results.md, the printed tables, and layers.png (each layer's units, parameters and
connections, on a log scale: weight sharing is the gap between the last two).

Expected output (measured on the 2-core CPU, jax 0.10.2: about 2 s in all, nothing is run
through the nets; the counts are machine-independent): LeNet-1989 1,256 units (1,000 +
256 inputs), 9,760 parameters, 64,660 connections, 63,660 multiply-adds; LeNet-1998 (with
the paper's RBF output) 9,118 units (8,094 + 1,024 inputs), 60,000 parameters, 340,908
connections, 332,824 multiply-adds;
AlexNet (two towers, 227x227) 659,272 neurons (+154,587 inputs), 60,965,224 parameters,
725,066,088 connections, 724,406,816 multiply-adds.
"""
from __future__ import annotations

import dataclasses
import time

from nets import accounting, models
from training import plots, results
from training.config import option, parse, run_main, to_dict
from training.harness import open_run

EXPERIMENT = "seed_table"

ROWS = ("task", "classes", "image size", "examples", "units", "parameters", "connections",
        "activation", "operations")
NA = "n/a"

# The lecture slide's values; n/a where the slide gives none (see the module docstring).
LECTURE = {
    "lenet1989": {"task": "digits", "classes": "10", "image size": "16x16",
                  "examples": "7,291", "units": "1,256", "parameters": "9,760",
                  "connections": "65k", "activation": "tanh", "operations": NA},
    "lenet1998": {"task": NA, "classes": "10", "image size": "32x32 (28x28 digits padded)",
                  "examples": "60,000", "units": NA, "parameters": NA, "connections": NA,
                  "activation": NA, "operations": NA},
    "alexnet2012": {"task": "ImageNet", "classes": "1000", "image size": "224x224",
                    "examples": "1.2M", "units": "650k", "parameters": "60M",
                    "connections": "630M", "activation": "ReLU", "operations": NA},
}

# The papers' values: LeCun et al. 1989 (Sections 2 and 5), LeCun et al. 1998 (Sections
# II.B and III.A), Krizhevsky et al. 2012 (Sections 2, 3.5). n/a: the paper does not say.
PAPER = {
    "lenet1989": {"task": "handwritten zip-code digits (U.S. mail)", "classes": "10",
                  "image size": "16x16", "examples": "7,291 (2,007 test)", "units": "1,256",
                  "parameters": "9,760", "connections": "64,660",
                  "activation": "scaled tanh", "operations": NA},
    "lenet1998": {"task": "handwritten digits (MNIST)", "classes": "10",
                  "image size": "32x32 (28x28 digits centred)",
                  "examples": "60,000 (10,000 test)", "units": NA, "parameters": "60,000",
                  "connections": "340,908", "activation": "1.7159 tanh(2a/3)",
                  "operations": NA},
    "alexnet2012": {"task": "ImageNet (ILSVRC-2010, -2012)", "classes": "1000",
                    "image size": "224x224x3", "examples": "1.2 million",
                    "units": "650,000", "parameters": "60 million", "connections": NA,
                    "activation": "ReLU", "operations": NA},
}

TITLES = {"lenet1989": "LeNet-1989", "lenet1998": "LeNet-1998", "alexnet2012": "AlexNet-2012"}
# Whether a paper's unit count includes the inputs: the 1989 paper's 1,256 does, AlexNet's
# 650,000 does not (the lecture's '8,084?' for LeNet-1998 would not either).
UNITS_INCLUDE_INPUTS = {"lenet1989": True, "lenet1998": False, "alexnet2012": False}

# AlexNet, Section 3.5: "the number of neurons in the network's remaining layers is given by
# 253,440-186,624-64,896-64,896-43,264-4096-4096-1000".
ALEXNET_PAPER_NEURONS = (253_440, 186_624, 64_896, 64_896, 43_264, 4096, 4096, 1000)


@dataclasses.dataclass(frozen=True)
class Config:
    scaled_tanh: bool = option(False, "LeNet-1989 with 1.7159 tanh(2x/3) instead of tanh")
    towers: int = option(2, "AlexNet towers (2: the paper's grouped conv2, conv4, conv5)",
                         choices=(1, 2))


def build_models(config: Config) -> dict:
    """{name: (model, input_shape, activation)} for the three nets."""
    lenet1989_activation = "1.7159 tanh(2x/3)" if config.scaled_tanh else "tanh"
    return {
        "lenet1989": (models.lenet1989(scaled_tanh=config.scaled_tanh),
                      models.LENET1989_INPUT_SHAPE, lenet1989_activation),
        "lenet1998": (models.lenet5(output="rbf"), models.LENET5_INPUT_SHAPE,
                      "1.7159 tanh(2a/3)"),
        "alexnet2012": (models.alexnet(towers=config.towers), models.ALEXNET_INPUT_SHAPE,
                        "ReLU"),
    }


def _n(value: int) -> str:
    return f"{value:,}"


def ours_column(counted: accounting.ModelCount, activation: str, with_inputs: bool) -> dict:
    """The values computed from our definition, as table cells; units with or without the
    inputs, as the paper counts them."""
    height, width, channels = counted.input_shape[1:]
    classes = counted.layers[-1].output_shape[-1]
    units = (f"{_n(counted.units)} ({_n(counted.neurons)} + {_n(counted.inputs)} inputs)"
             if with_inputs else f"{_n(counted.neurons)} (+{_n(counted.inputs)} inputs)")
    return {
        "task": "-", "classes": str(classes), "image size": f"{height}x{width}x{channels}",
        "examples": "-",
        "units": units,
        "parameters": _n(counted.params), "connections": _n(counted.connections),
        "activation": activation, "operations": f"{_n(counted.macs)} multiply-adds",
    }


def notes(counts: dict, config: Config) -> list[str]:
    """One sentence per difference between the lecture, the paper and our count."""
    lenet89, lenet5, alex = (counts[name] for name in ("lenet1989", "lenet1998", "alexnet2012"))
    alex224 = accounting.count(models.alexnet(towers=config.towers), (-1, 224, 224, 3))
    alex_other = accounting.count(models.alexnet(towers=3 - config.towers),
                                  models.ALEXNET_INPUT_SHAPE)
    dense5 = accounting.count(models.lenet5(output="dense"), models.LENET5_INPUT_SHAPE)
    c1_to_f6 = lenet5.neurons - lenet5.layer("output").units
    return [
        f"LeNet-1989 connections: the lecture's 65k rounds the paper's 64,660; ours "
        f"{_n(lenet89.connections)} (each unit's 25 or 200 weighted inputs, padding included, "
        f"plus its bias).",
        f"LeNet-1989 units: {_n(lenet89.neurons)} neurons + {_n(lenet89.inputs)} inputs, the "
        f"paper counts the inputs in its 1,256.",
        f"LeNet-1989 operations: {_n(lenet89.macs)} multiply-adds = connections minus one bias "
        f"per neuron; neither the paper nor the slide gives a figure.",
        "LeNet-1989 activation: the paper says only 'scaled hyperbolic tangent'; the lecture and "
        "our default use tanh, --scaled-tanh gives the 1998 paper's 1.7159 tanh(2x/3).",
        f"LeNet-1998 parameters: ours {_n(lenet5.params)}, the paper's 60,000 (C1 to F6, "
        f"exact, not rounded: the RBF output's centres are fixed bitmaps, not trained; ours "
        f"are drawn in nets.models.lenet5_rbf_centres). With a Dense output "
        f"(`lenet5(output=\"dense\")`, the experiment's default) {_n(dense5.params)}: 84 x 10 "
        f"weights and 10 biases more.",
        f"LeNet-1998 connections: ours {_n(lenet5.connections)}, the paper's 340,908, with "
        f"the RBF's 84 x 10 = {_n(lenet5.layer('output').connections)}; with the Dense output "
        f"{_n(dense5.connections)} (850 for it: a bias per output).",
        f"LeNet-1998 units: the paper gives no total; ours {_n(lenet5.neurons)} neurons "
        f"(C1 to F6: {_n(c1_to_f6)}, plus 10 outputs) + {_n(lenet5.inputs)} inputs. The lecture "
        f"value was reported as '8,084?', not confirmed from the slide (n/a); 8,084 would be "
        f"C1 to F6 without inputs and outputs.",
        f"LeNet-1998 operations: {_n(lenet5.macs)} multiply-adds (each subsampled input counted "
        "once); the paper gives none.",
        "AlexNet image size: the paper says 224x224x3, but conv1 (11x11, stride 4, no padding) "
        "gives Figure 2's 55x55 only from 227x227; we use 227.",
        f"AlexNet units: ours {_n(alex.neurons)} neurons, inputs apart ({_n(alex.inputs)}); the "
        f"paper's 650,000 is rounded, and its own per-layer list (Section 3.5) sums to "
        f"{_n(sum(ALEXNET_PAPER_NEURONS))} because it gives 253,440 for conv1, not 55 x 55 x 96 "
        f"= 290,400 ({alex.neurons / 650_000 - 1:+.1%} from 650k).",
        f"AlexNet parameters: ours {_n(alex.params)} ({alex.params / 60e6 - 1:+.1%} from 60M); "
        f"the {'one' if config.towers == 2 else 'two'}-tower variant has "
        f"{_n(alex_other.params)}.",
        f"AlexNet connections: the paper gives none; ours {_n(alex.connections)} "
        f"({alex.connections / 630e6 - 1:+.1%} from the lecture's 630M); with a 224x224 input "
        f"(conv1 54x54) the same count is {_n(alex224.connections)}; we could not derive 630M "
        "from the paper's architecture.",
        f"AlexNet operations: {_n(alex.macs)} multiply-adds (convolutions and fully connected "
        "layers; LRN, pooling and ReLU not counted).",
        "Examples: training-set sizes from the papers; this experiment trains nothing ('-').",
    ]


def comparison_rows(counts: dict, activations: dict) -> list[dict]:
    rows = []
    for quantity in ROWS:
        row = {"quantity": quantity}
        for name, title in TITLES.items():
            row[f"{title} lecture"] = LECTURE[name][quantity]
            row[f"{title} paper"] = PAPER[name][quantity]
            row[f"{title} ours"] = ours_column(counts[name], activations[name],
                                               UNITS_INCLUDE_INPUTS[name])[quantity]
        rows.append(row)
    return rows


def render(table: list[dict], counts: dict, note_lines: list[str], workdir) -> str:
    parts = [results.markdown_table(table), "\nNotes:\n\n"]
    parts += [f"{index}. {line}\n" for index, line in enumerate(note_lines, 1)]
    columns = ["name", "kind", "output_shape", "units", "params", "connections", "macs"]
    for name, counted in counts.items():
        rows = [{**row.as_dict(), "output_shape": "x".join(map(str, row.output_shape[1:]))}
                for row in counted.layers]
        rows.append({"name": "total", "kind": "", "output_shape": "",
                     "units": counted.units, "params": counted.params,
                     "connections": counted.connections, "macs": counted.macs})
        formatted = [{k: _n(v) if isinstance(v, int) else v for k, v in row.items()}
                     for row in rows]
        parts.append(f"\n{TITLES[name]} ({counted.name}), per example:\n\n")
        parts.append(results.markdown_table(formatted, columns))
    parts.append(f"\nresults in {workdir}\n")
    return "".join(parts)


def layer_panels(counts: dict) -> list[dict]:
    """Per net, each layer's units, free parameters and connections: a shared weight is one
    parameter but as many connections as it has uses."""
    panels = []
    for name, counted in counts.items():
        layers = [layer for layer in counted.layers if layer.connections]
        panels.append({
            "title": TITLES[name], "groups": [layer.name for layer in layers], "log": True,
            "ylabel": "count (per example)",
            "series": {quantity: [getattr(layer, field) for layer in layers]
                       for quantity, field in (("units", "units"), ("parameters", "params"),
                                               ("connections", "connections"))},
        })
    return panels


def main(argv=None) -> dict:
    config, harness_args = parse(Config, argv, __doc__, prog=f"python -m experiments.{EXPERIMENT}")
    workdir = open_run(EXPERIMENT, config, harness_args).workdir
    start = time.perf_counter()
    built = build_models(config)
    counts = {name: accounting.count(model, shape) for name, (model, shape, _) in built.items()}
    activations = {name: activation for name, (_, _, activation) in built.items()}
    table = comparison_rows(counts, activations)
    note_lines = notes(counts, config)
    seconds = {"compile": None, "run": time.perf_counter() - start}
    model_figures = {name: counted.as_dict() for name, counted in counts.items()}
    metrics = {name: counted.totals() for name, counted in counts.items()}
    results.write_results(workdir, EXPERIMENT, to_dict(config), metrics, [], seconds,
                          models=model_figures, table=table, notes=note_lines)
    plots.save_grouped_bars(workdir / "layers.png", layer_panels(counts),
                            title="units, parameters and connections per layer")
    results.save_and_print_table(workdir, render(table, counts, note_lines, workdir))
    return metrics


if __name__ == "__main__":
    run_main(main, EXPERIMENT)
