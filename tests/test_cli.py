"""The ``tropd`` command line: dispatch and argument forwarding (no torch work, milliseconds)."""

from __future__ import annotations

import sys
import types

import pytest

import megatron_tropd.demo
from megatron_tropd import __version__, cli


def test_version_prints_package_and_dependency_versions(capsys):
    assert cli.main(["version"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"megatron_tropd {__version__}"
    assert [line.split()[0] for line in lines[1:]] == ["torch", "megatron-core", "python"]


@pytest.mark.parametrize("argv", [[], ["--help"], ["--quick"], ["--out=somewhere", "extra"]])
def test_demo_hands_every_argument_to_the_demo(monkeypatch, argv):
    received = []
    fake_demo = types.ModuleType("megatron_tropd.demo.run")
    fake_demo.main = lambda demo_argv: received.append(demo_argv) or 3
    monkeypatch.setitem(sys.modules, "megatron_tropd.demo.run", fake_demo)
    monkeypatch.setattr(megatron_tropd.demo, "run", fake_demo, raising=False)
    assert cli.main(["demo", *argv]) == 3  # the demo's exit status is the command's
    assert received == [argv]


def test_unknown_command_and_stray_arguments_are_refused():
    with pytest.raises(SystemExit):
        cli.main([])
    with pytest.raises(SystemExit):
        cli.main(["nope"])
    with pytest.raises(SystemExit):
        cli.main(["version", "--bogus"])
