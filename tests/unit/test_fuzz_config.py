"""Fuzzing the config loader: `--set KEY=VALUE` assignments (known keys with hostile
values, misspelt and malformed keys, values nested past the recursion limit) and config
files (JSON and TOML, almost right or random bytes, devices and directories). Each
either gives a config or raises `ConfigError` with a one-line message; nothing else,
no hang, no unbounded read."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import event
from hypothesis import strategies as st
from pydantic import BaseModel

from kvflow.cli import main
from kvflow.cli.common import CLIError
from kvflow.cli.serve import read_secret_file
from kvflow.config import ConfigError, KVFlowConfig, parse_assignment
from kvflow.engine_adapters.latency_fit import read_preset
from tests.fuzz_helpers import deeply_nested, dumps, fuzz, json_values, no_hang

NUM_CASES = 600


def dotted_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every field of the config by dotted key, sections included."""
    keys = []
    for name, info in model.model_fields.items():
        key = f"{prefix}{name}"
        keys.append(key)
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys += dotted_keys(annotation, f"{key}.")
    return keys


KEYS = dotted_keys(KVFlowConfig)
keys = st.one_of(
    st.sampled_from(KEYS),
    st.sampled_from(KEYS).map(lambda k: k + ".x"),
    st.sampled_from(KEYS).map(lambda k: k.replace(".", "..", 1)),
    st.sampled_from(["", ".", " ", "=", "kv.", ".kv", "kv.block_size.", "__class__"]),
    st.text(max_size=12),
)
values = st.one_of(
    json_values.map(dumps),
    st.text(max_size=16),
    st.sampled_from(["", "1e999", "-1", "true", "null", "[]", "{}", "NaN", '"', deeply_nested()]),
)


VALID = st.sampled_from(
    [
        "scheduler.max_num_seqs=4",
        "kv.block_size=32",
        "kv.cpu.num_blocks=100",
        "kv.write_policy=write_through",
        "sim.preset=null",
        "policies.lpm.max_wait_s=0.5",
        "peer.host=127.0.0.1",
    ]
)
"""Assignments that load, so that lists of them (about one case in ten) load too."""


def load_or_refuse(assignments: list[str], path: Path | None = None) -> bool:
    """Load the config: it loads (True) or fails as documented (False)."""
    try:
        with no_hang(10):
            overrides = dict(parse_assignment(text) for text in assignments)
            config = KVFlowConfig.load(path, overrides)
    except ConfigError as err:
        message = str(err)
        assert message and "Traceback" not in message and "\n" not in message, message
        event("refused")
        return False
    assert isinstance(config, KVFlowConfig)
    event("loaded")
    return True


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory() as tmp:
        yield Path(tmp)


def fuzz_assignments(slow: bool) -> None:
    assignment = st.one_of(st.builds("{}={}".format, keys, values), st.text(max_size=20), VALID)
    fuzz(
        "config fuzz, --set",
        NUM_CASES,
        slow,
        load_or_refuse,
        assignments=st.lists(assignment, min_size=1, max_size=4),
    )


def fuzz_files(slow: bool, workdir: Path) -> None:
    def check(doc: dict[str, Any], suffix: str, mangle: str, junk: bytes) -> bool:
        path = workdir / f"config{suffix}"
        if mangle == "none":
            data = dumps(doc).encode()
        elif mangle == "toml-lines":  # TOML-looking lines with JSON values
            data = "\n".join(f"{k} = {dumps(v)}" for k, v in doc.items()).encode()
        elif mangle == "bytes":
            data = junk
        else:
            data = (f"a = {deeply_nested()}" if suffix == ".toml" else deeply_nested()).encode()
        path.write_bytes(data)
        return load_or_refuse([], path)

    fuzz(
        "config fuzz, files",
        NUM_CASES,
        slow,
        check,
        doc=st.dictionaries(keys, json_values, max_size=4),
        suffix=st.sampled_from([".json", ".toml"]),
        mangle=st.sampled_from(["none", "toml-lines", "bytes", "deep"]),
        junk=st.binary(max_size=64),
    )


def test_fuzzed_assignments_load_or_fail_as_documented() -> None:
    fuzz_assignments(slow=False)


def test_fuzzed_config_files_load_or_fail_as_documented(workdir: Path) -> None:
    fuzz_files(slow=False, workdir=workdir)


@pytest.mark.slow
def test_fuzzed_assignments_load_or_fail_as_documented_slow() -> None:
    fuzz_assignments(slow=True)


@pytest.mark.slow
def test_fuzzed_config_files_load_or_fail_as_documented_slow(workdir: Path) -> None:
    fuzz_files(slow=True, workdir=workdir)


@pytest.mark.parametrize("path", ["/dev/zero", "/dev/urandom", "/", "FIFO"])
def test_a_file_that_never_ends_or_is_no_file_is_refused_unread(path: str, tmp_path: Path) -> None:
    """A config, preset or secret path naming a device, a directory or a FIFO is refused
    before any read (reading /dev/zero whole would fill memory; opening a FIFO blocks)."""
    if path == "FIFO":
        path = str(tmp_path / "fifo")
        os.mkfifo(path)
    with no_hang(10):
        with pytest.raises(ConfigError, match="not a regular file"):
            KVFlowConfig.load(path)
        # Read once for the transfer figures it may carry (quietly: refused below).
        assert KVFlowConfig.from_dict({}, {"sim.preset_file": path}).sim.preset_file == path

        with pytest.raises(ConfigError, match="not a regular file"):
            read_preset(path)
        with pytest.raises(CLIError, match=r"--peer-secret-file .* not a regular file"):
            read_secret_file(path)


def test_the_cli_prints_one_line_for_a_deeply_nested_setting(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code = main(["replay", "--set", "kv.block_size=" + deeply_nested()])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("kvflow: error: --set kv.block_size: ") and err.count("\n") == 1
