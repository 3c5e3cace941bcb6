"""Where a run's reports go (`--json`, `--trace-events`, `--plot`), checked before the run
starts, so that a long replay does not end in an unwritable path, and no report ever
overwrites one of the run's inputs (the trace, the config file)."""

from __future__ import annotations

import itertools
import os
from collections.abc import Mapping
from pathlib import Path

from kvflow.cli.common import CLIError

STDOUT = "-"
"""The destination that means stdout (`--json -`): nothing to check."""


def _is_same_file(a: Path, b: Path) -> bool:
    """Whether two paths name one file: the same resolved path (symlinks and `..` taken
    out), or, when both exist, the same inode (hard links)."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet)
        return False


def _nearest_existing(path: Path) -> Path:
    """`path` or the closest of its ancestors that exists."""
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _check_writable_dir(flag: str, dest: str, directory: Path) -> None:
    if not directory.is_dir():
        raise CLIError(f"{flag} {dest}: {directory} is not a directory")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise CLIError(f"{flag} {dest}: cannot write in {directory} (permission denied)")


def _check_file(flag: str, dest: str) -> None:
    path = Path(dest)
    if path.is_dir():
        raise CLIError(f"{flag} {dest}: is a directory; give a file name")
    parent = Path(os.path.abspath(path)).parent
    if not parent.exists():
        raise CLIError(f"{flag} {dest}: directory {parent} does not exist")
    _check_writable_dir(flag, dest, parent)
    if path.exists() and not os.access(path, os.W_OK):
        raise CLIError(f"{flag} {dest}: the file is not writable")


def _check_directory(flag: str, dest: str) -> None:
    path = Path(dest)
    if path.exists() and not path.is_dir():
        raise CLIError(f"{flag} {dest}: exists and is not a directory")
    # A missing directory is made, with its missing parents, under the nearest ancestor.
    _check_writable_dir(flag, dest, _nearest_existing(path))


def model_files(model_dir: str | None) -> dict[str, Path]:
    """The files of a model directory (`--model DIR`) as inputs for `check_outputs`, by
    what they are ("the model's config.json"); none when it is not a directory."""
    if model_dir is None or not os.path.isdir(model_dir):
        return {}
    entries = sorted(Path(model_dir).iterdir())[:1000]  # bounded: a checkpoint's few files
    return {f"the model's {path.name}": path for path in entries if path.is_file()}


def check_outputs(
    files: Mapping[str, str | None],
    directories: Mapping[str, str | None],
    inputs: Mapping[str, str | Path | None],
) -> None:
    """Check the report destinations before anything runs.

    Args:
        files: file destinations by flag (`--json`, `--trace-events`); None or '-'
            (stdout) skips one.
        directories: directory destinations by flag (`--plot`), made if missing.
        inputs: the run's input files by what they are ("the trace", "the config
            file"); None skips one.

    Raises:
        CLIError: naming the flag and the path: a file destination that is a
            directory, in a missing or unwritable directory, or not writable; a
            directory destination that is a file or cannot be made; a file destination
            that is one of the inputs (compared as resolved paths and inodes); two flags
            naming the same file.
    """
    given = {flag: dest for flag, dest in files.items() if dest is not None and dest != STDOUT}
    for flag, dest in given.items():
        _check_file(flag, dest)
        for what, source in inputs.items():
            if source is not None and _is_same_file(Path(dest), Path(source)):
                raise CLIError(
                    f"{flag} {dest} is {what} ({source}): refusing to overwrite an input"
                )
    for (flag_a, a), (flag_b, b) in itertools.combinations(given.items(), 2):
        if _is_same_file(Path(a), Path(b)):
            raise CLIError(f"{flag_a} and {flag_b} name the same file {b}")
    for flag, directory in directories.items():
        if directory is not None:
            _check_directory(flag, directory)
