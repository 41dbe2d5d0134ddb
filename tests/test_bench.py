"""experiments.bench --quick on the smallest sizes: the results schema (no speed asserted)."""
import json

from experiments import bench

ROW_KEYS = {"family", "name", "variant", "median_s", "p10_s", "p90_s", "compile_s", "ratio",
            "ratio_of", "device"}


def test_quick_smallest_run_writes_the_schema(tmp_path):
    rows = bench.main(["--workdir", str(tmp_path), "--quick", "--size", "smallest"])
    document = json.loads((tmp_path / "results.json").read_text())
    assert document["benchmarks"] == json.loads(json.dumps(rows))
    assert {r["family"] for r in rows} == set(bench.FAMILIES)
    for entry in rows:
        assert ROW_KEYS <= set(entry), entry
        assert entry["median_s"] > 0
        if entry["family"] != "scaling":  # the scaling experiment measures medians only
            assert entry["p10_s"] <= entry["median_s"] <= entry["p90_s"]
        assert entry["repeats"] >= 10 or entry["family"] == "recipe"
    assert all(r["ratio_of"] for r in rows if r["ratio"] is not None)
    assert (tmp_path / "results.md").read_text().startswith("device ")
    assert (tmp_path / "ratios.png").stat().st_size > 5_000
