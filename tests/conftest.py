"""Fixtures shared by test modules across the suite."""

from tests.cli_run import cli

__all__ = ["cli"]  # `kvflow ARGS` in this process (tests/cli_run.py)
