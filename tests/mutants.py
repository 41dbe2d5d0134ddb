"""Can the tests fail? One-operator mutants of the hand-written derivatives, each run against
the tests.

    python -m tests.mutants [--modules conv,losses] [--per-function 1] [--seed 0]
                            [--workdir DIR] [--limit N] [--only nets/conv.py:313,...]

Every function of `nets/` whose name says it computes a derivative (backward, transpose,
tangent, curvature, grad, hessian_vector, bptt, pullback, ...), the functions `TRAINING`
names in `training/` (SDLM's and K-FAC's steps, clipping and ghost norms, conjugate gradients
and Lanczos; `--modules optim,parallel,procedures`), and the checkers `CHECKERS` names in
`nets/gradcheck.py` (relative error, finite differences and their kinks and tolerance, the
moved point, `layer_report`, `jax_differentiated`), is read with `ast`; each line
of its body that holds one of these operators gets one mutant, the first of them in this
order changed: `a + b` -> `a - b`, `a - b` -> `a + b`, `a * b` -> `a / b`, `sum(` -> `mean(`,
`[::-1` -> `[::1`, `** 2` -> `** 1`, `x.T` -> `x`. `--per-function N` draws N mutants a
function (2 where it has more than 5 lines of them), from `--seed`.

Each mutant is written into a copy of the tracked files (`git ls-files`, made once; the
checkout itself is never changed) and the tests run there with `pytest -x -n 2`, in two
stages: first `tests/test_<module>.py` and the files `RELATED` names for the module; if all
of those pass, every other test file that names the module or one of the names of its
`__all__`. A mutant that passes both is a
survivor: a change to a derivative that no test sees. Writes `results.json` (every mutant,
killed or not, the test that failed first, seconds) and `results.md` into --workdir (default
`runs/mutants/<UTC timestamp>/`). On the 2-core CPU a killed mutant takes 5-90 s.
"""
from __future__ import annotations

import argparse
import ast
import datetime
import json
import os
import pathlib
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
DERIVATIVE = re.compile(r"backward|transpose|tangent|curvature|grad|hessian_vector|bptt|"
                        r"pullback|vjp|_dx|_dw", re.IGNORECASE)
OPERATORS = ((" + ", " - "), (" - ", " + "), (" * ", " / "), ("jnp.sum(", "jnp.mean("),
             (".sum(", ".mean("), ("[::-1", "[::1"), (" ** 2", " ** 1"), (".T", ""))
SKIPPED = ("raise ", "def ", "if ", "elif ", "assert ", "check", '"', "'", 'f"')
# test files, besides tests/test_<module>.py, that check a module's derivatives first
# hand-written math outside nets/: each file's functions to mutate, named
TRAINING = {
    "training/optim.py": ("diagonal_levenberg_marquardt", "_averaged", "_damped",
                          "_damped_factors", "_spd_inverse", "_solve",
                          "scale_by_kronecker_factors", "_dot", "_step_coefficients",
                          "kfac_adaptive"),
    "training/parallel.py": ("per_example_value_and_grad", "gradient_norms", "clip_gradients",
                             "weighted_sum", "private_value_and_grad", "_clip_scale",
                             "_mean_loss", "_weight_dot", "_gram_squares", "_factored_sum",
                             "_gram_leaves", "_ghost_pass", "ghost_norms",
                             "ghost_clipped_sum", "mean_over_devices"),
    "training/procedures.py": ("curvature_on_subset", "conjugate_gradient", "lanczos",
                               "saddle_free_step"),
}
# the references and verdicts of nets/gradcheck.py that the rule does not name (it takes
# `gradient_report` and `finite_difference_grads`): a wrong checker passes wrong gradients
CHECKERS = {
    "nets/gradcheck.py": ("_flat_pair", "relative_error", "cosine_similarity",
                          "moved_parameters", "shifted_energies", "_leaf_indices", "kink_gaps",
                          "finite_difference_tolerance", "smooth_coordinates", "layer_report",
                          "jax_differentiated", "_equations", "_name_stacks", "_differentiated",
                          "_wider_floats"),
}
RELATED = {"engines": ("curvature", "gauss_newton"), "losses": ("curvature",),
           "layers": ("combinators", "gauss_newton", "hessian_product", "curvature"),
           "models": ("gauss_newton", "hessian_product"),
           "recurrent": ("recurrent_gauss_newton", "hessian_product"),
           **dict.fromkeys(("attention", "normalization", "pooling", "conv"),
                           ("gauss_newton", "hessian_product", "curvature")),
           "optim": ("kronecker",), "parallel": ("private",),
           "procedures": ("hessian_free", "curvature")}


def derivative_spans(source: str, names: tuple[str, ...] = ()) -> list[tuple[str, int, int]]:
    """(name, first line, last line) of every function named like a derivative (or, given
    names, of the functions so named), its docstring left out."""
    spans = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.FunctionDef) and (
                node.name in names if names else DERIVATIVE.search(node.name)):
            first = node.body[0]
            docstring = (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
                         and isinstance(first.value.value, str))
            spans.append((node.name, first.end_lineno + 1 if docstring else first.lineno,
                          node.end_lineno))
    return spans


def mutants_of(path: str, source: str) -> list[dict]:
    """One mutant per eligible line (the first operator of OPERATORS on it), each line once
    even where functions nest."""
    lines, seen, mutants = source.splitlines(), set(), []
    spans = derivative_spans(source, TRAINING.get(path, ()))
    if path in CHECKERS:
        spans += derivative_spans(source, CHECKERS[path])
    for name, first, last in spans:
        for number in range(first, last + 1):
            code = lines[number - 1].split("#")[0]
            if number in seen or not code.strip() or code.strip().startswith(SKIPPED) \
                    or "Error" in code:
                continue
            seen.add(number)
            for old, new in OPERATORS:
                if old in code:
                    mutants.append({"file": path, "line": number, "function": name, "old": old,
                                    "new": new, "text": code.strip()})
                    break
    return mutants


def choose(mutants: list[dict], per_function: int, seed: int) -> list[dict]:
    """per_function mutants of each (file, function), twice that for one with more than 5."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for mutant in mutants:
        groups.setdefault((mutant["file"], mutant["function"]), []).append(mutant)
    rng = random.Random(seed)
    return [mutant for key in sorted(groups) for mutant in rng.sample(
        groups[key], min(len(groups[key]), per_function * (2 if len(groups[key]) > 5 else 1)))]


def mutate(source: str, mutant: dict) -> str:
    """source with the mutant's operator changed on its line (comments untouched)."""
    lines = source.split("\n")
    code, hash_, comment = lines[mutant["line"] - 1].partition("#")
    if mutant["old"] not in code:
        raise ValueError(f"{mutant['file']}:{mutant['line']}: {mutant['old']!r} not found")
    lines[mutant["line"] - 1] = code.replace(mutant["old"], mutant["new"], 1) + hash_ + comment
    return "\n".join(lines)


def public_names(source: str) -> list[str]:
    """The names a module's `__all__` lists (none without one)."""
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and any(
                isinstance(target, ast.Name) and target.id == "__all__" for target in node.targets):
            return list(ast.literal_eval(node.value))
    return []


def test_stages(copy: pathlib.Path, module: str) -> list[list[str]]:
    """[the module's own and related test files, the other files that name the module or
    one of its public names (`BatchNorm` for normalization)]."""
    first = [f"tests/test_{name}.py" for name in (module, *RELATED.get(module, ()))
             if (copy / f"tests/test_{name}.py").exists()]
    path = copy / (f"nets/{module}.py" if (copy / "nets" / f"{module}.py").exists()
                   else f"training/{module}.py")
    names = [module, *public_names(path.read_text())]
    mention = re.compile(r"\b(" + "|".join(map(re.escape, names)) + r")\b")
    rest = sorted(str(path.relative_to(copy)) for path in (copy / "tests").glob("test_*.py")
                  if str(path.relative_to(copy)) not in first
                  and mention.search(path.read_text()))
    return [stage for stage in (first, rest) if stage]


def run_mutant(copy: pathlib.Path, mutant: dict, python: str) -> dict:
    """Apply the mutant in the copy, run its test stages until one fails, restore the file."""
    path = copy / mutant["file"]
    original = path.read_text()
    path.write_text(mutate(original, mutant))
    start, failure, ran = time.perf_counter(), None, []
    try:
        for stage in test_stages(copy, pathlib.Path(mutant["file"]).stem):
            ran += stage
            finished = subprocess.run(
                [python, "-m", "pytest", "-x", "-q", "-n", "2", "-p", "no:cacheprovider",
                 *stage], cwd=copy, capture_output=True, text=True, env=test_environment())
            if finished.returncode != 0:
                failed = [line for line in finished.stdout.splitlines()
                          if line.startswith(("FAILED", "ERROR"))]
                failure = failed[0] if failed else finished.stdout.strip().splitlines()[-1]
                break
    finally:
        path.write_text(original)
    return {**mutant, "killed": failure is not None, "failure": failure, "tests": ran,
            "seconds": round(time.perf_counter() - start, 1)}


def test_environment() -> dict:
    """This process's environment, with NETS_DATA_DIR pointing at the checkout's data (the
    copy has no ../shared beside it)."""
    shared = ROOT.parent / "shared" / "data"
    if "NETS_DATA_DIR" in os.environ or not shared.is_dir():
        return dict(os.environ)
    return {**os.environ, "NETS_DATA_DIR": str(shared)}


def tracked_copy(destination: pathlib.Path) -> pathlib.Path:
    """The tracked files of the checkout, as they are now, copied into destination."""
    names = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True,
                           check=True).stdout.decode().split("\0")
    for name in filter(None, names):
        if (ROOT / name).is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, destination / name)
    return destination


def summary(records: list[dict]) -> str:
    killed = sum(record["killed"] for record in records)
    rows = ["| file:line | function | mutation | killed by |", "|---|---|---|---|"]
    rows += [f"| {r['file']}:{r['line']} | {r['function']} | `{r['old'].strip()}` -> "
             f"`{r['new'].strip() or '(none)'}` | "
             f"{(r['failure'] or 'SURVIVED').replace('|', '/')[:100]} |" for r in records]
    return "\n".join([f"{killed} of {len(records)} mutants killed.", "", *rows, ""])


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="python -m tests.mutants", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modules", default="", help="comma-separated modules of nets/ "
                        f"or {', '.join(sorted(TRAINING))} (default: every one)")
    parser.add_argument("--per-function", type=int, default=1, help="mutants per function")
    parser.add_argument("--seed", type=int, default=0, help="seed of the draw")
    parser.add_argument("--limit", type=int, default=0, help="run at most this many (0: all)")
    parser.add_argument("--only", default="", help="comma-separated FILE:LINE, e.g. "
                        "nets/conv.py:313: those mutants alone (a survivor re-run after a "
                        "new test), whatever --per-function draws")
    parser.add_argument("--workdir", default="", help="where results.json and results.md go")
    args = parser.parse_args(argv)
    if args.per_function < 1 or args.limit < 0:
        parser.error(f"--per-function must be >= 1 and --limit >= 0, got {args.per_function} "
                     f"and {args.limit}")
    files = {path.stem: f"nets/{path.name}" for path in (ROOT / "nets").glob("*.py")}
    files.update((pathlib.Path(name).stem, name) for name in TRAINING)
    known = sorted(files, key=files.get)
    modules = args.modules.split(",") if args.modules else known
    if unknown := sorted(set(modules) - set(known)):
        parser.error(f"--modules: unknown {unknown}; choose from {known}")
    mutants = [mutant for module in modules for mutant in mutants_of(
        files[module], (ROOT / files[module]).read_text())]
    chosen = choose(mutants, args.per_function, args.seed)[:args.limit or None]
    if args.only:
        wanted = args.only.split(",")
        chosen = [mutant for mutant in mutants if f"{mutant['file']}:{mutant['line']}" in wanted]
        if missing := sorted(set(wanted) - {f"{m['file']}:{m['line']}" for m in chosen}):
            parser.error(f"--only: no mutant at {missing} (a line of a derivative that holds "
                         "an operator)")
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    workdir = pathlib.Path(args.workdir or ROOT / "runs" / "mutants" / stamp)
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"{len(chosen)} of {len(mutants)} mutants; results in {workdir}", flush=True)
    records = []
    with tempfile.TemporaryDirectory() as temporary:
        copy = tracked_copy(pathlib.Path(temporary))
        for mutant in chosen:
            records.append(run_mutant(copy, mutant, sys.executable))
            (workdir / "results.json").write_text(json.dumps(records, indent=1))
            record = records[-1]
            print(f"{'killed  ' if record['killed'] else 'SURVIVED'} {record['file']}:"
                  f"{record['line']} {record['function']}: {record['text'][:70]} "
                  f"({record['seconds']} s)", flush=True)
    (workdir / "results.md").write_text(summary(records))
    print(summary(records).splitlines()[0])
    return records


if __name__ == "__main__":
    main()
