"""experiments/seed_table.py end to end: results.json keys, the computed numbers, the table."""
import json

import pytest

from experiments import seed_table
from nets import accounting
from training.config import ConfigError

DESIGN_KEYS = {"experiment", "config", "environment", "metrics", "history", "seconds"}
EXPECTED = {
    "lenet1989": {"inputs": 256, "neurons": 1_000, "units": 1_256, "params": 9_760,
                  "connections": 64_660, "macs": 63_660},
    "lenet1998": {"inputs": 1_024, "neurons": 8_094, "units": 9_118, "params": 60_000,
                  "connections": 340_908, "macs": 332_824},
    "alexnet2012": {"inputs": 154_587, "neurons": 659_272, "units": 813_859,
                    "params": 60_965_224, "connections": 725_066_088, "macs": 724_406_816},
}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("seed_table")
    metrics = seed_table.main(["--workdir", str(workdir)])
    return workdir, metrics, json.loads((workdir / "results.json").read_text())


def test_results_json_has_the_design_and_experiment_keys(run):
    workdir, metrics, document = run
    assert DESIGN_KEYS | {"models", "table", "notes"} <= set(document)
    assert document["experiment"] == "seed_table"
    assert document["config"] == {"scaled_tanh": False, "towers": 2}
    assert document["metrics"] == metrics
    assert (workdir / "config.json").exists() and (workdir / "results.md").exists()


def test_computed_numbers(run):
    _, metrics, document = run
    assert metrics == EXPECTED
    for name, totals in EXPECTED.items():
        model = document["models"][name]
        assert {key: model[key] for key in totals} == totals
        layers = model["layers"]
        assert layers[0]["name"] == "input" and layers[0]["units"] == totals["inputs"]
        for key in ("params", "connections", "macs"):
            assert sum(layer[key] for layer in layers) == totals[key], (name, key)
    h2 = document["models"]["lenet1989"]["layers"][2]
    assert (h2["name"], h2["units"], h2["params"], h2["connections"]) == (
        "H2", 192, 2_592, 38_592)
    c3 = document["models"]["lenet1998"]["layers"][3]
    assert (c3["name"], c3["params"], c3["connections"]) == ("C3", 1_516, 151_600)


def test_layer_plot_shows_the_issue_s_per_layer_counts(run):
    """The figures the plot draws, against the per-layer counts the issue gives by hand."""
    workdir, _, _ = run
    assert (workdir / "layers.png").stat().st_size > 10_000
    built = seed_table.build_models(seed_table.Config())
    counts = {name: accounting.count(model, shape) for name, (model, shape, _) in built.items()}
    panels = {panel["title"]: panel for panel in seed_table.layer_panels(counts)}
    lenet89 = panels["LeNet-1989"]
    assert lenet89["groups"] == ["H1", "H2", "H3", "output"]
    assert lenet89["series"] == {"units": [768, 192, 30, 10],
                                 "parameters": [1_068, 2_592, 5_790, 310],
                                 "connections": [19_968, 38_592, 5_790, 310]}
    lenet98 = panels["LeNet-1998"]
    assert lenet98["groups"][:6] == ["C1", "S2", "C3", "S4", "C5", "F6"]
    assert lenet98["series"]["parameters"][:6] == [156, 12, 1_516, 32, 48_120, 10_164]
    assert lenet98["series"]["connections"][:6] == [122_304, 5_880, 151_600, 2_000, 48_120,
                                                    10_164]


def test_table_rows_and_columns(run):
    workdir, _, document = run
    table = document["table"]
    assert [row["quantity"] for row in table] == list(seed_table.ROWS)
    by_quantity = {row["quantity"]: row for row in table}
    assert len(table[0]) == 1 + 3 * 3  # the quantity, then lecture, paper, ours per net
    assert by_quantity["connections"]["LeNet-1989 lecture"] == "65k"
    assert by_quantity["connections"]["LeNet-1989 paper"] == "64,660"
    assert by_quantity["connections"]["LeNet-1989 ours"] == "64,660"
    assert by_quantity["parameters"]["LeNet-1998 ours"] == "60,000"
    assert by_quantity["connections"]["LeNet-1998 ours"] == "340,908"
    assert by_quantity["units"]["LeNet-1989 ours"] == "1,256 (1,000 + 256 inputs)"
    assert by_quantity["units"]["AlexNet-2012 ours"] == "659,272 (+154,587 inputs)"
    assert by_quantity["image size"]["AlexNet-2012 ours"] == "227x227x3"
    assert by_quantity["units"]["LeNet-1998 lecture"] == "n/a"
    text = (workdir / "results.md").read_text()
    assert "| parameters | 9,760 | 9,760 | 9,760 |" in text
    assert "60,965,224" in text and "643,635,688" in text  # the 224x224 variant, in a note
    assert len(document["notes"]) >= 10


def test_flags_change_the_computed_column(tmp_path):
    metrics = seed_table.main(["--workdir", str(tmp_path), "--towers", "1", "--scaled-tanh"])
    assert metrics["alexnet2012"]["params"] == 62_378_344
    assert metrics["lenet1989"] == EXPECTED["lenet1989"]
    document = json.loads((tmp_path / "results.json").read_text())
    activation = {row["quantity"]: row for row in document["table"]}["activation"]
    assert activation["LeNet-1989 ours"] == "1.7159 tanh(2x/3)"
    with pytest.raises(ConfigError, match="towers"):
        seed_table.main(["--workdir", str(tmp_path)])  # a different config in the same dir
