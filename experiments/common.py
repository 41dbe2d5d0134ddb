"""Command-line plumbing shared by the experiments (until the research harness lands)."""
from __future__ import annotations

import argparse
import pathlib

from training.results import default_workdir

__all__ = ["parser_for", "workdir_from", "positive", "non_negative"]


def positive(kind):
    """An argparse type: `kind(text)` that must be > 0."""

    def parse(text):
        value = kind(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    return parse


def non_negative(kind):
    """An argparse type: `kind(text)` that must be >= 0."""

    def parse(text):
        value = kind(text)
        if not value >= 0:
            raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
        return value

    return parse


def parser_for(module_docstring: str) -> argparse.ArgumentParser:
    """A parser whose description is the experiment's docstring, with --workdir."""
    parser = argparse.ArgumentParser(
        description=module_docstring, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--workdir", type=pathlib.Path, default=None,
        help="run directory (default: runs/<experiment>/<UTC timestamp>/)",
    )
    return parser


def workdir_from(args: argparse.Namespace, experiment: str) -> pathlib.Path:
    """The --workdir given, or the default one; created."""
    workdir = args.workdir or default_workdir(experiment)
    workdir.mkdir(parents=True, exist_ok=True)
    return workdir
