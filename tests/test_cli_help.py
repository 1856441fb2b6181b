"""Every command, option and positional of the ``dmf`` command line has help text."""

from __future__ import annotations

import argparse

from dmf.cli import build_parser


def commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ("dmf",)):
    """(command path, parser, help of the command) of every command and sub-command."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in action._choices_actions}
            for name, sub in action.choices.items():
                yield path + (name,), sub, helps.get(name)
                yield from commands(sub, path + (name,))


def test_every_command_and_option_has_help():
    parser = build_parser()
    found = list(commands(parser))
    names = {" ".join(p) for p, _, _ in found}
    # The walk reaches the commands of every area, nested ones included.
    assert {"dmf run", "dmf ingest", "dmf recommend", "dmf data movielens"} <= names
    assert {"dmf config show", "dmf config schema"} <= names
    missing = [" ".join(p) for p, _, h in found if not h]
    for path, sub, _ in [(("dmf",), parser, None), *found]:
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue  # argparse's own -h
            if isinstance(action, argparse._SubParsersAction):
                continue  # its commands are checked one by one (above)
            if not action.help or action.help == argparse.SUPPRESS:
                what = "/".join(action.option_strings) or action.dest
                missing.append(f"{' '.join(path)} {what}")
    assert not missing, "without help text: " + "; ".join(missing)


def test_help_is_printed_for_every_command():
    # argparse formats each help text (a stray % in one would raise here).
    parser = build_parser()
    for path, sub, _ in commands(parser):
        text = sub.format_help()
        assert text.startswith("usage: " + " ".join(path)), path
