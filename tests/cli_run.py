"""`kvflow ARGS` for the tests, two ways.

In this process (`kvflow.cli.main(argv)`, its output captured by pytest's `capsys`), for
a test about a command's message, exit status and files: the same code runs as behind
`python -m kvflow` (whose `__main__` only calls `main`), and an exception that escaped
`main` would fail the test as a traceback would reach a user. A fresh process costs a
second or more of interpreter and import start-up, so this is the default.

In a fresh process (`tests.integration.test_cli_refusals.kvflow`), for a test about the
entry point itself: that no traceback reaches the user, a memory limit that a refusal
must hold under, a command that would serve (and so never end here) were its refusal
lost. Each command keeps at least one such test.
"""

from __future__ import annotations

import contextlib
import functools
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import pytest

from kvflow.cli import main


class CLIRun(NamedTuple):
    """A command's exit status and output (named as `subprocess.CompletedProcess`'s)."""

    returncode: int
    stdout: str
    stderr: str


CLIResult = CLIRun | subprocess.CompletedProcess[str]
"""What a test checks of a run, in this process or in a fresh one."""

CLI = Callable[..., CLIRun]
"""`cli(*args, cwd=None)`: `kvflow ARGS` in this process, in `cwd` when given."""


def run_in_process(
    capsys: pytest.CaptureFixture[str], *args: str, cwd: Path | None = None
) -> CLIRun:
    """`kvflow ARGS` through `kvflow.cli.main`, in `cwd` when given; a usage error's
    `SystemExit` (argparse) is its exit status."""
    capsys.readouterr()  # what came before is not this run's output
    with contextlib.chdir(cwd) if cwd is not None else contextlib.nullcontext():
        try:
            code = main(list(args))
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else int(exit_.code is not None)
    out = capsys.readouterr()
    return CLIRun(code, out.out, out.err)


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> CLI:
    """`kvflow ARGS` in this process: `run_in_process` bound to the test's `capsys`
    (every test may take it: tests/conftest.py)."""
    return functools.partial(run_in_process, capsys)


__all__ = ["CLI", "CLIResult", "CLIRun", "cli", "run_in_process"]
