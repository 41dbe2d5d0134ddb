"""Configs: flags generated from dataclasses, and errors that name the option and the value."""
import dataclasses

import pytest

from training.config import ConfigError, check, differences, option, parse, to_dict


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


@pytest.mark.parametrize("argv,message", [
    (["--lr", "-1"], "argument --lr: got '-1'; allowed: > 0"),
    (["--lr", "fast"], "argument --lr: got 'fast'; expected float"),
    (["--batch", "0"], "argument --batch: got '0'; allowed: >= 1"),
    (["--engine", "magic"], "allowed: one of manual, autodiff"),
    (["--steps-list", "2,0"], "argument --steps-list: got '2,0'; allowed: >= 1"),
    (["--momentum", "0.9"], "unrecognized arguments: --momentum 0.9"),
])
def test_bad_options_fail_before_any_work(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse(Config, argv)
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
