"""`kvflow serve --role`, `kvflow router --prefill` and `kvflow cluster up --pd/--ray`
refuse bad input with one `kvflow: error:` line, before anything starts."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration.test_cli_refusals import assert_one_line_error, kvflow

CPU = ("--set", "kv.cpu.num_blocks=64")


def torch_args(tmp_path: Path) -> list[str]:
    # Any directory passes the --model check; these refusals come before loading it.
    return ["--engine", "torch", "--model", str(tmp_path)]


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["serve", "--role", "prefill"], ["--role prefill", "--engine torch"]),
        (["serve", "{torch}", "--role", "decode"], ["--role decode", "kv.cpu.num_blocks"]),
        (["cluster", "up", "--pd", "1:1"], ["--pd", "--engine torch"]),
        (["cluster", "up", "--pd", "2", "{torch}"], ["--pd", "P:D", "'2'"]),
        (["cluster", "up", "--pd", "1:1", "--instances", "3", "{torch}"], ["P + D = 2", "3"]),
        (["cluster", "up", "--pd", "1:2", "{torch}"], ["decode", "kv.cpu.num_blocks"]),
        (["cluster", "up"], ["--instances N"]),
        (
            ["router", "--instance", "http://127.0.0.1:1", "--prefill", "http://127.0.0.1:1"],
            ["--prefill", "--instance"],
        ),
    ],
)
def test_a_bad_role_or_split_is_refused(
    tmp_path: Path, args: list[str], needles: list[str]
) -> None:
    argv = [a for arg in args for a in (torch_args(tmp_path) if arg == "{torch}" else [arg])]
    assert_one_line_error(kvflow(*argv, cwd=tmp_path), *needles)


def test_negative_ray_resources_are_refused(tmp_path: Path) -> None:
    pytest.importorskip("ray")
    done = kvflow(
        "cluster", "up", "--instances", "1", "--ray-cpus-per-instance", "-1", cwd=tmp_path
    )
    assert_one_line_error(done, "--ray-cpus-per-instance", "-1")
