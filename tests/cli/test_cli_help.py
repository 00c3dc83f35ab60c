"""Every option of every modelcheck subcommand is described, with an example; every --help
shows examples and the exit statuses; the seed inspector's options are where they make sense."""
import argparse

import pytest

from pytest_modelcheck import cli
from pytest_modelcheck.cli import parser


def _subcommands():
    p = parser()
    action = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


@pytest.mark.parametrize("name", ["inspect", "profile", "compare", "merge"])
def test_every_option_has_help_with_an_example(name):
    sub = _subcommands()[name]
    options = [a for a in sub._actions if not isinstance(a, argparse._HelpAction)]
    assert options
    for action in options:
        label = "/".join(action.option_strings) or action.dest
        assert action.help and action.help.strip(), f"{name} {label}: no help"
        assert "e.g." in action.help, f"{name} {label}: no example in {action.help!r}"
    text = sub.format_help()
    assert "examples:" in text and f"modelcheck {name} " in text.split("examples:")[1]
    assert "exit status:" in text and "1  a gate failed" in text and "2  a usage mistake" in text


def test_top_level_help_and_module_doc_name_the_exit_statuses():
    assert "exit status:" in parser().format_help()
    for line in ("0  success", "1  a gate failed", "2  a usage mistake"):
        assert line in cli.__doc__


@pytest.mark.parametrize("name, options", [
    ("inspect", {"--config", "--checkpoint", "--verbose", "--batch-size", "--allow-unsafe",
                 "--input-shape"}),
    ("profile", {"--config", "--checkpoint", "--verbose", "--batch-size", "--batch-sizes",
                 "--allow-unsafe", "--memory-budget", "--input-shape"}),
    ("compare", {"--verbose", "--allow-unsafe", "--fail-over", "--top"}),
])
def test_the_seed_inspectors_options_are_where_they_make_sense(name, options):
    present = {s for a in _subcommands()[name]._actions for s in a.option_strings}
    assert options <= present


def test_help_exits_0(capsys):
    for name in _subcommands():
        with pytest.raises(SystemExit) as exc:
            cli.main([name, "--help"])
        assert exc.value.code == 0
    assert "--memory-budget SIZE" in capsys.readouterr().out
