"""How commands are wired: every command of the `edvit` table is a module with
`add_arguments` and `run`, and building the whole parser stays cheap for every process."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

from edvit.cli import COMMANDS, build_parser


def test_every_command_module_exports_add_arguments_and_run() -> None:
    for command in COMMANDS:
        module = importlib.import_module(command.module)
        assert callable(module.add_arguments) and callable(module.run), command.module


def test_every_command_is_in_the_parser() -> None:
    parser = build_parser()
    (subcommands,) = (a for a in parser._actions if a.dest == "command")
    assert list(subcommands.choices) == [c.name for c in COMMANDS]


@pytest.mark.fleet  # a fresh interpreter, to see what building the parser imports
def test_building_the_parser_loads_no_heavy_module() -> None:
    # A node or aggregator builds the whole parser at start: what it loads stays in memory.
    code = (
        "import sys, edvit.cli; edvit.cli.build_parser();"
        "heavy = ('cv2', 'torch', 'timm', 'onnx', 'starlette', 'uvicorn', 'asyncio',"
        " 'multiprocessing');"
        "print(sorted(m for m in heavy if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
