"""Configs: flags generated from dataclasses, and errors that name the option and the value."""
import dataclasses

import pytest

from training.config import (
    ConfigError,
    check,
    check_applicable,
    differences,
    option,
    parse,
    run_main,
    to_dict,
)
from training.data import DataError
from training.harness import NonFiniteError


@dataclasses.dataclass(frozen=True)
class Config:
    lr: float = option(0.1, "learning rate", gt=0)
    batch: int = option(32, "batch size", ge=1)
    engine: str = option("manual", "engine", choices=("manual", "autodiff"))
    verbose: bool = option(False, "say more")
    steps_list: tuple[int, ...] = option((), "steps", ge=1)


def test_defaults_and_overrides():
    config, args = parse(Config, [])
    assert config == Config()
    assert args.workdir is None and not args.resume and not args.force
    config, args = parse(Config, ["--lr", "0.5", "--batch=7", "--engine", "autodiff",
                                  "--verbose", "--steps-list", "3,4", "--workdir", "w",
                                  "--resume"])
    assert config == Config(0.5, 7, "autodiff", True, (3, 4))
    assert str(args.workdir) == "w" and args.resume


def test_integer_tuples_take_ranges():
    """"A-B" in an integer tuple stands for A, A + 1, ..., B, among single items."""
    assert parse(Config, ["--steps-list", "3-6"])[0].steps_list == (3, 4, 5, 6)
    assert parse(Config, ["--steps-list", "1,4-5,9"])[0].steps_list == (1, 4, 5, 9)
    assert parse(Config, ["--steps-list", "7-7"])[0].steps_list == (7,)


@pytest.mark.parametrize("argv,message", [
    (["--steps-list", "6-3"], "argument --steps-list: got '6-3'; the range '6-3' ends before "
                              "it starts"),
    (["--steps-list", "0-2"], "argument --steps-list: got '0-2'; allowed: >= 1"),
    (["--steps-list", "1-x"], "argument --steps-list: got '1-x'; expected int"),
    (["--lr", "-1"], "argument --lr: got '-1'; allowed: > 0"),
    (["--lr", "fast"], "argument --lr: got 'fast'; expected float"),
    (["--batch", "0"], "argument --batch: got '0'; allowed: >= 1"),
    (["--engine", "magic"], "allowed: one of manual, autodiff"),
    (["--steps-list", "2,0"], "argument --steps-list: got '2,0'; allowed: >= 1"),
    (["--momentum", "0.9"], "unrecognized arguments: --momentum 0.9"),
])
def test_bad_options_fail_before_any_work(argv, message, capsys):
    assert_parse_refuses(Config, argv, message, capsys)


def assert_parse_refuses(config_class, argv, message, capsys):
    """parse exits with argparse's status 2 before any work, `message` on stderr."""
    with pytest.raises(SystemExit) as exit_info:
        parse(config_class, argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_help_lists_every_option_with_its_default(capsys):
    with pytest.raises(SystemExit):
        parse(Config, ["--help"])
    text = capsys.readouterr().out
    for flag, default in (("--lr", "0.1"), ("--batch", "32"), ("--engine", "'manual'"),
                          ("--verbose", "False"), ("--steps-list", "()")):
        assert flag in text and f"default: {default}" in text


def test_check_applies_the_same_rules_to_configs_built_in_code():
    with pytest.raises(ConfigError, match="option --batch: got 0; allowed: >= 1"):
        check(Config(batch=0))
    with pytest.raises(ConfigError, match="option --lr: got 'x' of type str; expected float"):
        check(Config(lr="x"))
    assert check(Config(lr=1)) == Config(lr=1)  # an int is a fine float


def test_differences_name_each_changed_field():
    assert differences(to_dict(Config()), to_dict(Config(lr=0.2, batch=8))) == [
        "batch: 32 -> 8", "lr: 0.1 -> 0.2"]
    assert differences({"a": 1}, {}) == ["a: 1 -> '<absent>'"]


def _exit_code(main, **kwargs):
    with pytest.raises(SystemExit) as exit_info:
        run_main(main, "demo", **kwargs)
    return exit_info.value.code


@pytest.mark.parametrize("returned,code", [(None, 0), ({"loss": 0.5}, 0), (0, 0), (3, 3)])
def test_run_main_exits_with_an_int_from_main_and_zero_otherwise(returned, code):
    assert _exit_code(lambda: returned) == code


@pytest.mark.parametrize("error", [
    ConfigError("option --lr: got -1"), DataError("usps.bz2 is missing"),
    NonFiniteError("5 non-finite steps"), FloatingPointError("invalid value (nan)")])
def test_run_main_turns_user_errors_into_one_line(error):
    def main():
        raise error
    assert _exit_code(main) == f"demo: {error}"  # a str code: printed to stderr, status 1


def test_run_main_reports_extra_errors_and_lets_other_errors_through():
    def missing():
        raise FileNotFoundError("runs/a has no results.json")
    assert _exit_code(missing, extra_errors=(FileNotFoundError,)) == (
        "demo: runs/a has no results.json")
    with pytest.raises(FileNotFoundError):
        run_main(missing, "demo")

    def bug():
        raise KeyError("loss")
    with pytest.raises(KeyError):
        run_main(bug, "demo", extra_errors=(FileNotFoundError,))


def test_an_option_that_would_do_nothing_is_refused():
    """--batch only with --engine autodiff here: changed from its default under the other
    engine it is refused with both options named; at its default, or with the engine it
    needs, it is accepted."""
    only_with = {"batch": ("engine", "autodiff")}
    with pytest.raises(ConfigError, match=r"option --batch: got 7; it applies only with "
                                          r"--engine autodiff \(got --engine manual\)"):
        check_applicable(Config(batch=7), only_with)
    assert check_applicable(Config(), only_with) == Config()
    assert check_applicable(Config(batch=7, engine="autodiff"), only_with).batch == 7


@dataclasses.dataclass(frozen=True)
class Lists:
    cells: tuple[str, ...] = option(("elman", "lstm"), "cells", choices=("elman", "lstm"))
    depths: tuple[int, ...] = option((1, 2), "depths", ge=1)
    nan_steps: tuple[int, ...] = option((), "steps (default: none)", ge=1)


@pytest.mark.parametrize("flag,text,allowed", [
    ("--cells", "", "at least one value, each one of elman, lstm"),
    ("--cells", ",", "at least one value, each one of elman, lstm"),
    ("--depths", " , ", "at least one value, each >= 1"),
])
def test_an_empty_list_is_refused_where_the_default_is_not_empty(flag, text, allowed, capsys):
    """An empty list would run nothing (no cells, no depths); where the default is empty
    ("none", "all") an empty list is that default and stays allowed."""
    assert_parse_refuses(Lists, [flag, text],
                         f"argument {flag}: got {text!r}; allowed: {allowed}", capsys)
    with pytest.raises(ConfigError, match=r"option --depths: got \(\); allowed: at least one "
                                          r"value, each >= 1"):
        check(Lists(depths=()))
    assert parse(Lists, ["--nan-steps", ""])[0].nan_steps == ()


@pytest.mark.parametrize("text", ["1,,2", "1,", ",2", "1, ,2"])
def test_an_empty_item_beside_others_is_refused_not_skipped(text, capsys):
    """`--depths 1,,2` was read as (1, 2) without a word: a value left out by mistake."""
    assert_parse_refuses(Lists, ["--depths", text],
                         f"argument --depths: got {text!r}; an empty item in the list", capsys)
    assert parse(Lists, ["--depths", "1, 2"])[0].depths == (1, 2)


@dataclasses.dataclass(frozen=True)
class Floats:
    lr: float = option(0.1, "learning rate", gt=0)
    rates: tuple[float, ...] = option((0.1, 0.2), "rates", ge=0)
    dropout: float = option(0.0, "dropout", ge=0, lt=1)
    tolerance: float = option(1e-4, "stops at once when inf", ge=0, finite=False)


@pytest.mark.parametrize("flag,text,allowed", [
    ("--lr", "inf", "> 0 and finite"),
    ("--lr", "Infinity", "> 0 and finite"),
    ("--rates", "0.1,inf", ">= 0 and finite"),
    ("--dropout", "inf", ">= 0 and < 1"),
])
def test_an_infinite_float_is_refused_unless_the_option_allows_it(flag, text, allowed, capsys):
    """`--lr inf` used to pass the bounds (inf > 0) and fail deep in the run with a
    traceback; an option that gives inf a meaning says so (finite=False)."""
    assert_parse_refuses(Floats, [flag, text],
                         f"argument {flag}: got {text!r}; allowed: {allowed}", capsys)
    with pytest.raises(ConfigError, match=r"option --lr: got inf; allowed: > 0 and finite"):
        check(Floats(lr=float("inf")))
    assert parse(Floats, ["--tolerance", "inf"])[0].tolerance == float("inf")
    assert check(Floats(tolerance=float("inf"))).tolerance == float("inf")


@pytest.mark.parametrize("flag,text,allowed", [
    ("--depths", "1,2,1", "distinct values, each >= 1"),
    ("--depths", "1-3,2", "distinct values, each >= 1"),
    ("--cells", "lstm,lstm", "distinct values, each one of elman, lstm"),
    ("--nan-steps", "4,4", "distinct values, each >= 1"),
])
def test_a_repeated_list_item_is_refused(flag, text, allowed, capsys):
    """`--depths 1,1` ran the same runs twice and kept one result under the repeated key."""
    assert_parse_refuses(Lists, [flag, text],
                         f"argument {flag}: got {text!r}; allowed: {allowed}", capsys)
    with pytest.raises(ConfigError, match=r"option --depths: got \(2, 2\); allowed: distinct "
                                          r"values, each >= 1"):
        check(Lists(depths=(2, 2)))


def test_a_list_that_checks_its_own_items_may_repeat_them():
    @dataclasses.dataclass(frozen=True)
    class Seeds:
        seeds: tuple[int, ...] = option((0, 1), "seeds", ge=0, distinct=False)

    assert parse(Seeds, ["--seeds", "1,1"])[0].seeds == (1, 1)
