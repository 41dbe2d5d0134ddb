"""The README's layer example runs as printed, and its gradient check can fail."""
from __future__ import annotations

import contextlib
import io
import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
MARKER = "<!-- tested: tests/test_readme.py -->"
CORRECT_DX = 'return dparams, dy * params["g"][None, :]'


def readme_example() -> str:
    """The python block that follows the marker in README.md."""
    text = README.read_text()
    if text.count(MARKER) != 1:
        raise AssertionError(f"README.md: expected one {MARKER!r}, found {text.count(MARKER)}")
    match = re.match(r"\s*```python\n(.*?)\n```", text.split(MARKER)[1], re.S)
    if match is None:
        raise AssertionError(f"README.md: no ```python block right after {MARKER!r}")
    return match.group(1)


def run(source: str) -> dict:
    namespace: dict = {"__name__": "readme_example"}
    with contextlib.redirect_stdout(io.StringIO()):
        exec(compile(source, "README.md", "exec"), namespace)  # noqa: S102
    return namespace


def failed_layers(report: list[dict]) -> set[str]:
    return {row["layer"] for row in report if not row["passed"]}


@pytest.fixture(scope="module")
def example() -> str:
    return readme_example()


def test_readme_layer_example_passes_its_check_and_trains(example):
    namespace = run(example)
    report = namespace["report"]
    assert [(row["layer"], row["param"]) for row in report] == [
        ("hidden", "b"), ("hidden", "w"), ("scale", "b"), ("scale", "g"), ("out", "b"),
        ("out", "w")]
    assert failed_layers(report) == set()
    assert max(row["rel_err_vs_autodiff"] for row in report) <= 1e-10
    assert [(row["param"], row["passed"]) for row in namespace["alone"]] == [
        ("dx", True), ("b", True), ("g", True)]
    assert float(namespace["energy"]) < 0.05  # the README says 0.0097 after 100 steps


def test_readme_layer_example_check_catches_a_missing_gain_in_dx(example):
    """The bug the README describes: dx without its factor g shows in the layer below in the
    net's report, and in the layer's own dx row when it is checked alone."""
    assert example.count(CORRECT_DX) == 1
    namespace = run(example.replace(CORRECT_DX, "return dparams, dy"))
    assert failed_layers(namespace["report"]) == {"hidden"}
    # checked alone, the layer's own dx row fails and its parameters' rows pass
    assert [(row["param"], row["passed"]) for row in namespace["alone"]] == [
        ("dx", False), ("b", True), ("g", True)]


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation other than '-' and '_'
    dropped, spaces turned into '-'."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def test_readme_links_to_its_own_headings_resolve():
    text = README.read_text()
    outside_code = re.sub(r"```.*?```", "", text, flags=re.S)
    anchors = {github_anchor(h) for h in re.findall(r"^#+ (.+)$", outside_code, re.M)}
    links = set(re.findall(r"\]\(#([^)]+)\)", text))
    assert links, "README.md: no links to its own headings found"
    assert sorted(links - anchors) == []


def markdown_files() -> list[pathlib.Path]:
    root = README.parent
    return [README, root / "BENCHMARKS.md", *sorted((root / "docs").glob("*.md"))]


def anchors_of(path: pathlib.Path) -> set[str]:
    outside_code = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return {github_anchor(h) for h in re.findall(r"^#+ (.+)$", outside_code, re.M)}


def test_links_between_the_markdown_files_resolve():
    """Every relative link of README.md, BENCHMARKS.md and docs/*.md names a file that
    exists and, where it has one, a heading of that file: the notes moved out of the README
    into docs/ keep their links into it."""
    broken = []
    for path in markdown_files():
        outside_code = re.sub(r"```.*?```|`[^`\n]*`", "", path.read_text(), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", outside_code):
            if re.match(r"[a-z]+:", target):
                continue
            file_part, _, anchor = target.partition("#")
            linked = (path.parent / file_part).resolve() if file_part else path
            if not linked.exists():
                broken.append(f"{path.name}: {target} (no such file)")
            elif anchor and linked.suffix == ".md" and anchor not in anchors_of(linked):
                broken.append(f"{path.name}: {target} (no such heading)")
    assert len(markdown_files()) >= 3
    assert broken == []


def test_github_anchor_by_hand():
    assert github_anchor("Training procedures (`training/procedures.py`)") == \
        "training-procedures-trainingprocedurespy"
    assert github_anchor("LeCun 1989, plain SGD") == "lecun-1989-plain-sgd"
