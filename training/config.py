"""Experiment configs: frozen dataclasses, one per experiment, with command-line flags.

An experiment declares its config as a frozen dataclass whose fields are made with `option`:

    @dataclasses.dataclass(frozen=True)
    class Config:
        lr: float = option(0.25, "learning rate eta", gt=0)
        restarts: int = option(5, "random restarts", ge=1)
        engine: str = option("manual", "gradient engine", choices=("manual", "autodiff"))

`parse(Config, argv)` turns every field into a flag (`--lr 0.1`, `--no-flag` for booleans,
`--nan-steps 3,4` for tuples, `--seeds 0-9` for the integers 0 to 9), adds the harness flags
(`--workdir`, `--resume`, `--force`), and checks every value against its bounds before any work
starts. `check(config)` applies the same checks to a config built in code, and
`check_applicable(config, only_with)` refuses an option that would do nothing (an optimizer's
option given with another optimizer). Errors are `ConfigError`s naming the option, the value
and what is allowed. Every experiment module ends with

    if __name__ == "__main__":
        run_main(main, EXPERIMENT)

so that a bad value, a missing data file or a diverged run ends in one line, not a traceback.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import pathlib
import sys
import typing
from typing import Any, Callable, Sequence

from training.data import DataError

__all__ = ["ConfigError", "option", "check", "check_applicable", "at_most", "parse", "to_dict",
           "differences", "HarnessArgs", "USER_ERRORS", "run_main"]


class ConfigError(ValueError):
    """A config value that is not allowed, raised before any work starts."""


def option(default: Any, help: str, *, gt=None, ge=None, lt=None, le=None, choices=None,
           finite: bool = True, distinct: bool = True):
    """A config field with its help text and the values it allows.

    A list option (a tuple) whose default is not empty must not be given empty: `--cells ""`
    would run nothing. One whose default is empty (`--nan-steps`, `--metrics`: "none" or
    "all") may be. A float option refuses an infinite value (`--lr inf` would fail deep in
    the run, or train on nothing but NaNs) unless finite=False says that it means something
    (a stopping tolerance that stops at once). A list option refuses a repeated item
    (`--depths 1,1` would run the same thing twice and keep one result) unless
    distinct=False (an option that checks its items itself)."""
    floats = isinstance(default, float) or (
        isinstance(default, tuple) and any(isinstance(item, float) for item in default))
    metadata = {"help": help, "gt": gt, "ge": ge, "lt": lt, "le": le, "choices": choices,
                "nonempty": isinstance(default, tuple) and len(default) > 0,
                "finite": finite and floats,
                "distinct": distinct and isinstance(default, tuple)}
    return dataclasses.field(default=default, metadata=metadata)


def _allowed(meta: dict) -> str:
    parts = []
    for key, symbol in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<=")):
        if meta.get(key) is not None:
            parts.append(f"{symbol} {meta[key]}")
    if meta.get("finite") and meta.get("lt") is None and meta.get("le") is None:
        parts.append("finite")  # an upper bound says so already
    if meta.get("choices"):
        parts.append("one of " + ", ".join(map(str, meta["choices"])))
    return " and ".join(parts) or "any value"


def _refusal(value: Any, meta: dict) -> str | None:
    """What the option allows, when value is not allowed (an item out of bounds, or an empty
    list where the option needs one item at least); None when it is."""
    if isinstance(value, tuple) and not value and meta.get("nonempty"):
        allowed = _allowed(meta)
        return "at least one value" + ("" if allowed == "any value" else f", each {allowed}")
    if isinstance(value, tuple) and meta.get("distinct") and len(set(value)) < len(value):
        allowed = _allowed(meta)
        return "distinct values" + ("" if allowed == "any value" else f", each {allowed}")
    for item in value if isinstance(value, tuple) else (value,):
        bad = (
            (meta.get("gt") is not None and not item > meta["gt"])
            or (meta.get("ge") is not None and not item >= meta["ge"])
            or (meta.get("lt") is not None and not item < meta["lt"])
            or (meta.get("le") is not None and not item <= meta["le"])
            or (meta.get("choices") and item not in meta["choices"])
            or (meta.get("finite") and isinstance(item, float) and math.isinf(item))
        )
        if bad:
            return _allowed(meta)
    return None


def _check_value(name: str, value: Any, meta: dict) -> None:
    refusal = _refusal(value, meta)
    if refusal is not None:
        raise ConfigError(f"option --{_flag(name)}: got {value!r}; allowed: {refusal}")


def _flag(name: str) -> str:
    return name.replace("_", "-")


def _field_types(config_class) -> dict[str, Any]:
    return typing.get_type_hints(config_class)


def check(config) -> Any:
    """Raise ConfigError for the first field outside its bounds; return config."""
    types = _field_types(type(config))
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        expected = types[field.name]
        base = typing.get_origin(expected) or expected
        if base is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, base) or (base is int and isinstance(value, bool)):
            raise ConfigError(
                f"option --{_flag(field.name)}: got {value!r} of type {type(value).__name__}; "
                f"expected {getattr(expected, '__name__', expected)}")
        _check_value(field.name, value, field.metadata)
    return config


def check_applicable(config, only_with: dict[str, tuple[str, Any]]) -> Any:
    """Raise ConfigError for an option changed from its default where it would do nothing.

    only_with maps an option to the (option, value) it needs, e.g. {"mu": ("optimizer",
    "sdlm")}: `--mu 0.05` with another optimizer is refused, not silently ignored."""
    defaults = type(config)()
    for name, (switch, needed) in only_with.items():
        value, switched = getattr(config, name), getattr(config, switch)
        if value != getattr(defaults, name) and switched != needed:
            raise ConfigError(f"option --{_flag(name)}: got {value!r}; it applies only with "
                              f"--{_flag(switch)} {needed} (got --{_flag(switch)} {switched})")
    return config


def at_most(config, name: str, limit: int, what: str) -> int:
    """config.<name>, an int option, where it is at most `limit`; `limit` where the option
    kept its default and the default exceeds it (a default sized for the whole data set, run
    on a subset); an explicit value above `limit` is a ConfigError naming `what` (e.g. "300
    training digits"), not cut silently."""
    value = getattr(config, name)
    if value <= limit:
        return value
    if value == getattr(type(config)(), name):
        return limit
    raise ConfigError(f"option --{_flag(name)}: got {value}; allowed: at most the {what}")


def _parser_type(name: str, kind, meta: dict):
    """An argparse type that converts, checks bounds, and names the option on failure."""
    item_kind = typing.get_args(kind)[0] if typing.get_origin(kind) is tuple else kind

    def convert_one(text):
        try:
            return item_kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"got {text!r}; expected {item_kind.__name__} ({_allowed(meta)})") from None

    def items(text):
        """The comma-separated items; for integers "A-B" (0 <= A <= B) stands for A, ..., B.
        "" (or ",") is the empty list; an empty item beside others ("1,,2", "1,") is refused,
        not skipped."""
        parts = [t.strip() for t in text.split(",")]
        if any(parts) and not all(parts):
            raise argparse.ArgumentTypeError(f"got {text!r}; an empty item in the list")
        for item in parts:
            first, dash, last = item.partition("-")
            if item_kind is int and dash and first.isdigit() and last.isdigit():
                if int(last) < int(first):
                    raise argparse.ArgumentTypeError(
                        f"got {text!r}; the range {item!r} ends before it starts")
                yield from range(int(first), int(last) + 1)
            elif item:
                yield convert_one(item)

    def convert(text):
        if typing.get_origin(kind) is tuple:
            value = tuple(items(text))
        else:
            value = convert_one(text)
        refusal = _refusal(value, meta)
        if refusal is not None:
            raise argparse.ArgumentTypeError(f"got {text!r}; allowed: {refusal}")
        return value

    convert.__name__ = getattr(item_kind, "__name__", "value")
    return convert


@dataclasses.dataclass(frozen=True)
class HarnessArgs:
    """The harness flags every experiment has."""

    workdir: pathlib.Path | None
    resume: bool
    force: bool


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        self.print_usage()
        self.exit(2, f"{self.prog}: error: {message}\n(see --help for every option and its "
                     "default)\n")


def parse(config_class, argv: Sequence[str] | None, description: str = "",
          prog: str | None = None):
    """(config, HarnessArgs) from the command line; exits with status 2 on a bad option."""
    parser = _Parser(prog=prog, description=description,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    harness = parser.add_argument_group("run directory")
    harness.add_argument("--workdir", type=pathlib.Path, default=None,
                         help="run directory (default: runs/<experiment>/<UTC timestamp>/)")
    harness.add_argument("--resume", action="store_true",
                         help="continue from the newest valid checkpoint in --workdir "
                              "(re-running with the same --workdir does the same)")
    harness.add_argument("--force", action="store_true",
                         help="use --workdir even if it holds a run with a different config")
    options = parser.add_argument_group("config")
    types = _field_types(config_class)
    for field in dataclasses.fields(config_class):
        kind, meta = types[field.name], field.metadata
        help_text = f"{meta.get('help', '')} (default: {field.default!r}; {_allowed(meta)})"
        if kind is bool:
            options.add_argument(f"--{_flag(field.name)}", dest=field.name, default=field.default,
                                 action=argparse.BooleanOptionalAction, help=help_text)
        else:
            options.add_argument(f"--{_flag(field.name)}", dest=field.name, default=field.default,
                                 type=_parser_type(field.name, kind, meta), help=help_text,
                                 metavar=_flag(field.name).upper().replace("-", "_"))
    args = parser.parse_args(argv)
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(config_class)}
    config = check(config_class(**values))
    return config, HarnessArgs(args.workdir, args.resume, args.force)


def to_dict(config) -> dict:
    """The config as a JSON-ready dict (tuples as lists)."""
    items = dataclasses.asdict(config).items()
    return {k: list(v) if isinstance(v, tuple) else v for k, v in items}


def differences(saved: dict, current: dict) -> list[str]:
    """'name: saved -> current' for every field that differs (or exists on one side only)."""
    lines = []
    for name in sorted(set(saved) | set(current)):
        if saved.get(name, "<absent>") != current.get(name, "<absent>"):
            lines.append(f"{name}: {saved.get(name, '<absent>')!r} -> "
                         f"{current.get(name, '<absent>')!r}")
    return lines


# A bad option, a missing or corrupt data file, and a run that diverged (training.harness's
# NonFiniteError is a FloatingPointError; naming the subclass here would import the harness, and
# JAX with it, into every config parse, and the harness imports this module).
USER_ERRORS = (ConfigError, DataError, FloatingPointError)


def run_main(main: Callable[[], Any], name: str,
             extra_errors: tuple[type[BaseException], ...] = ()) -> typing.NoReturn:
    """Run an experiment's `main()` from the command line and exit the process.

    Exits with main's return value when it is an int, as `sys.exit(main())` would (gradcheck
    returns 1 when a check fails), and with status 0 for anything else: most mains return their
    metrics dict for tests and notebooks, which is not an exit status.

    The errors a user can cause and fix (`USER_ERRORS`, and any of `extra_errors`) end in the one
    line `"{name}: {error}"` on stderr and status 1; any other exception is a bug and keeps its
    traceback.

    Args:
      main: the experiment's entry point, called with no arguments (it reads sys.argv).
      name: the prefix of the error line, usually the module's EXPERIMENT.
      extra_errors: further exception types to report the same way.
    """
    try:
        status = main()
    except (*USER_ERRORS, *extra_errors) as error:
        sys.exit(f"{name}: {error}")
    sys.exit(status if isinstance(status, int) else 0)
