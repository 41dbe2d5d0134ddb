"""tests/mutants.py: which lines get mutants, how one is applied, and that a run tells a test
that catches it from one that does not."""
from __future__ import annotations

import sys

import pytest

from tests import mutants

SOURCE = '''def forward(x):
    return x + 1


def backward(params, dy):
    """The docstring: a + b is not code."""
    if dy is None:
        raise ValueError("dy - missing")
    dx = dy * params["w"]  # a comment - untouched
    dw = (dy.T @ params["x"]).sum(axis=0)
    return 1 - dw, dx[::-1]
'''


def test_mutants_are_one_per_code_line_of_a_derivative_its_first_listed_operator():
    found = [(m["line"], m["function"], m["old"], m["new"])
             for m in mutants.mutants_of("nets/toy.py", SOURCE)]
    assert found == [(9, "backward", " * ", " / "), (10, "backward", ".sum(", ".mean("),
                     (11, "backward", " - ", " + ")]


def test_a_mutant_changes_its_operator_once_and_leaves_the_comment():
    line_nine = mutants.mutants_of("nets/toy.py", SOURCE)[0]
    mutated = mutants.mutate(SOURCE, line_nine).splitlines()
    assert mutated[8] == '    dx = dy / params["w"]  # a comment - untouched'
    assert mutated[:8] + mutated[9:] == SOURCE.splitlines()[:8] + SOURCE.splitlines()[9:]
    with pytest.raises(ValueError, match="nets/toy.py:2: ' \\* ' not found"):
        mutants.mutate(SOURCE, {**line_nine, "line": 2})


def test_choose_draws_per_function_and_twice_as_many_from_a_long_one():
    many = [{"file": "f", "function": "long", "line": n} for n in range(7)]
    few = [{"file": "f", "function": "short", "line": n} for n in range(3)]
    chosen = mutants.choose(many + few, 1, seed=0)
    assert sorted(m["function"] for m in chosen) == ["long", "long", "short"]
    assert chosen == mutants.choose(many + few, 1, seed=0)


@pytest.mark.parametrize("check, killed", [("assert backward(3.0) == 7.0", True),
                                           ("assert callable(backward)", False)])
def test_a_test_that_checks_the_value_kills_the_mutant_and_a_weak_one_does_not(
        tmp_path, check, killed):
    (tmp_path / "nets").mkdir()
    (tmp_path / "tests").mkdir()
    (tmp_path / "nets" / "toy.py").write_text("def backward(x):\n    return 2 * x + 1\n")
    (tmp_path / "tests" / "test_toy.py").write_text(
        f"from nets.toy import backward\n\n\ndef test_value():\n    {check}\n")
    mutant = mutants.mutants_of("nets/toy.py", (tmp_path / "nets" / "toy.py").read_text())[0]
    assert (mutant["old"], mutant["new"]) == (" + ", " - ")  # + before * in OPERATORS
    record = mutants.run_mutant(tmp_path, mutant, sys.executable)
    assert record["killed"] is killed and record["tests"] == ["tests/test_toy.py"]
    assert (tmp_path / "nets" / "toy.py").read_text() == "def backward(x):\n    return 2 * x + 1\n"
    if killed:
        assert record["failure"].startswith("FAILED tests/test_toy.py::test_value")


def test_the_second_stage_is_every_other_file_naming_the_module_or_its_public_names(tmp_path):
    (tmp_path / "nets").mkdir()
    (tmp_path / "tests").mkdir()
    (tmp_path / "nets" / "toy.py").write_text('__all__ = ["Scale", "shift"]\n')
    files = {"test_toy.py": "", "test_uses_scale.py": "from nets import Scale",
             "test_imports_toy.py": "import nets.toy", "test_unrelated.py": "Scaled, shifty",
             "test_other_shift.py": "x = shift(1)"}
    for name, text in files.items():
        (tmp_path / "tests" / name).write_text(text)
    assert mutants.test_stages(tmp_path, "toy") == [
        ["tests/test_toy.py"],
        ["tests/test_imports_toy.py", "tests/test_other_shift.py", "tests/test_uses_scale.py"]]


def test_the_checkers_of_gradcheck_get_mutants_beside_the_rules_functions():
    """nets/gradcheck.py's references and verdicts (`CHECKERS`) are mutated as well as the
    functions the naming rule takes there; other files of nets/ by the rule alone."""
    source = ("def relative_error(a, b):\n    return a - b\n\n\n"
              "def gradient_report(a, b):\n    return a + b\n\n\n"
              "def helper(a, b):\n    return a * b\n")
    found = mutants.mutants_of("nets/gradcheck.py", source)
    assert sorted((m["line"], m["function"]) for m in found) == [
        (2, "relative_error"), (6, "gradient_report")]
    assert [m["function"] for m in mutants.mutants_of("nets/toy.py", source)] == [
        "gradient_report"]


def test_in_training_only_the_functions_named_for_the_file_get_mutants():
    """training/ has no naming rule for its math: TRAINING names the functions (SDLM's and
    K-FAC's steps, clipping and ghost norms, conjugate gradients), and a module of training/
    gets its test stages as one of nets/ does."""
    source = ("def _step_coefficients(a, b):\n    return a - b\n\n\n"
              "def backward_helper(a, b):\n    return a + b\n")
    found = mutants.mutants_of("training/optim.py", source)
    assert [(m["line"], m["function"], m["old"]) for m in found] == [
        (2, "_step_coefficients", " - ")]
    assert [m["function"] for m in mutants.mutants_of("nets/toy.py", source)] == [
        "backward_helper"]
    for name, functions in mutants.TRAINING.items():
        defined = set(mutants.derivative_spans((mutants.ROOT / name).read_text(), functions))
        assert {span[0] for span in defined} == set(functions), name
    for name, functions in mutants.CHECKERS.items():
        defined = set(mutants.derivative_spans((mutants.ROOT / name).read_text(), functions))
        assert {span[0] for span in defined} == set(functions), name
    stages = mutants.test_stages(mutants.ROOT, "optim")
    assert stages[0] == ["tests/test_optim.py", "tests/test_kronecker.py"]
    assert "tests/test_procedures.py" in stages[1]
