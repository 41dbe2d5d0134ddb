"""training/plots.py: every kind of figure is written, edge values drawn or counted, bad input
refused."""
import matplotlib.image
import numpy as np
import pytest

from training import plots


def pixels(path):
    return matplotlib.image.imread(path)


def test_scatter_keeps_positive_points_and_writes_one_panel_each(tmp_path):
    xs = np.logspace(-3, 0, 50)
    panels = [{"title": "a", "xlabel": "x", "ylabel": "y",
               "series": {"on the line": (xs, xs), "with zeros": ([0.0, -1.0, 0.5], [1, 1, 0.4])}},
              {"title": "b", "xlabel": "x", "ylabel": "y",
               "series": {f"s{k}": ([k + 1.0], [k + 2.0]) for k in range(12)}}]
    plots.save_scatter(tmp_path / "s.png", panels, title="t")
    height, width = pixels(tmp_path / "s.png").shape[:2]
    assert width > 1.8 * height  # two panels side by side


def test_strips_draw_zero_errors_at_the_floor(tmp_path):
    plots.save_strips(tmp_path / "e.png", ["m1", "m2"],
                      {"float64": [("m1", 0.0), ("m2", 1e-16)], "float32": [("m2", 3e-7)]},
                      "relative error", references={"tolerance": 1e-5})
    assert (tmp_path / "e.png").stat().st_size > 5_000


def test_grouped_bars_refuse_a_series_of_the_wrong_length(tmp_path):
    panel = {"title": "net", "groups": ["H1", "H2"], "log": True,
             "series": {"parameters": [1068, 2592], "connections": [19968]}}
    with pytest.raises(ValueError, match="'connections' has 1 values for 2 groups"):
        plots.save_grouped_bars(tmp_path / "b.png", [panel])
    panel["series"]["connections"] = [19968, 38592]
    plots.save_grouped_bars(tmp_path / "b.png", [panel, panel])
    height, width = pixels(tmp_path / "b.png").shape[:2]
    assert width > 1.8 * height


def test_images_need_one_caption_each_and_kernels_one_input_map(tmp_path):
    images = np.zeros((3, 16, 16))
    with pytest.raises(ValueError, match="3 images but 2 captions"):
        plots.save_images(tmp_path / "i.png", list(images), ["a", "b"])
    with pytest.raises(ValueError, match=r"expected \(height, width, 1, maps\), got "
                                         r"\(5, 5, 2, 4\)"):
        plots.save_kernels(tmp_path / "k.png", np.ones((5, 5, 2, 4)))
    plots.save_misclassified(tmp_path / "m.png", images[..., None],
                             [{"index": 2, "label": 1, "predicted": 7}])
    assert (tmp_path / "m.png").stat().st_size > 1_000


def test_activation_maps_are_the_spatial_activations_of_one_example(tmp_path):
    import jax

    import nets

    model = nets.lenet1989()
    params = model.init(jax.random.key(0), (-1, 16, 16, 1))[1]
    x = jax.random.uniform(jax.random.key(1), (2, 16, 16, 1), "float32", -1.0, 1.0)
    maps = plots.activation_maps(model, params, x[:1])
    assert [(name, array.shape) for name, array in maps] == [("H1", (8, 8, 12)),
                                                             ("H2", (4, 4, 12))]
    assert np.abs(maps[0][1]).max() <= 1.0  # tanh
    with pytest.raises(ValueError, match=r"expected one example \(1, ...\), got \(2, 16"):
        plots.activation_maps(model, params, x)
    plots.save_feature_maps(tmp_path / "f.png", np.asarray(x[0, :, :, 0]), maps)
    assert (tmp_path / "f.png").stat().st_size > 10_000


def test_spreads_take_one_or_several_values_a_row(tmp_path):
    plots.save_spreads(tmp_path / "s.png", [
        {"xlabel": "test misses", "rows": {"a": [104, 110, 98], "b": [120]}},
        {"xlabel": "held-out misses", "rows": {"a": [20, 25, 22], "b": [30]}}])
    height, width = pixels(tmp_path / "s.png").shape[:2]
    assert width > 1.8 * height


def test_histogram_bars_share_bin_edges_and_refuse_empty_series(tmp_path):
    same = np.linspace(0.0, 1.0, 20)
    plots.save_histogram(tmp_path / "h.png", {"plain": same, "perturbed": same.copy()},
                         "log10 E", title="t", bins=5, threshold=0.5)
    assert (tmp_path / "h.png").stat().st_size > 5_000
    with pytest.raises(ValueError, match=r"save_histogram: .*non-empty 1-d.*\(0,\)"):
        plots.save_histogram(tmp_path / "e.png", {"a": same, "b": []}, "x")


@pytest.fixture
def drawn(monkeypatch):
    """Every call of Axes.scatter, axvline, imshow and set_title, recorded and then made."""
    import matplotlib.axes

    calls = []
    for method in ("scatter", "axvline", "imshow", "set_title"):
        original = getattr(matplotlib.axes.Axes, method)

        def record(self, *args, _original=original, _method=method, **kwargs):
            calls.append((_method, args, kwargs))
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(matplotlib.axes.Axes, method, record)
    return calls


def test_non_finite_values_are_counted_and_drawn_not_dropped(tmp_path, drawn):
    """A NaN relative error is what a gradient plot must show: the strips draw it as a red
    cross and count it; every reference line is drawn (there were 4 line styles for 6); a NaN
    first in a scatter panel used to make its top NaN and hide every point."""
    references = {f"tol{k}": 10.0**-k for k in range(1, 7)}
    plots.save_strips(tmp_path / "e.png", ["m1", "m2"],
                      {"float64": [("m1", float("nan")), ("m2", 1e-16)]}, "relative error",
                      references=references)
    assert [args[0] for method, args, _ in drawn if method == "axvline"] == list(
        references.values())
    crosses = [kwargs for method, _, kwargs in drawn if kwargs.get("marker") == "x"]
    assert len(crosses) == 1 and "float64: 1 not finite" in crosses[0]["label"]
    drawn.clear()
    panel = {"title": "p", "xlabel": "x", "ylabel": "y",
             "series": {"nan first": ([float("nan"), 1.0, 3.0], [1.0, 2.0, 3.0])}}
    plots.save_scatter(tmp_path / "s.png", [panel])
    (points,) = [args for method, args, _ in drawn if method == "scatter"]
    assert list(points[0]) == [1.0, 3.0] and list(points[1]) == [2.0, 3.0]
    titles = [args[0] for method, args, _ in drawn if method == "set_title"]
    assert any("1 points <= 3e-12 or not finite not shown" in title for title in titles)


def test_heatmaps_scale_down_to_a_negative_entry(tmp_path, drawn):
    matrix = np.array([[-5.0, 1.0], [3.0, 0.0]])
    plots.save_heatmaps(tmp_path / "h.png", [[matrix]], ["r"], ["c"], "x", "y")
    (image,) = [kwargs for method, _, kwargs in drawn if method == "imshow"]
    assert (image["vmin"], image["vmax"]) == (-5.0, 3.0)
