"""`kvflow serve`'s peer options refuse bad input with one `kvflow: error:` line, before
anything is bound or loaded."""

from __future__ import annotations

import socket
from pathlib import Path

from tests.integration.test_cli_refusals import assert_one_line_error, kvflow


def torch_serve(tmp_path: Path, *args: str) -> list[str]:
    # Any directory passes the --model check; these refusals come before loading it.
    return ["serve", "--engine", "torch", "--model", str(tmp_path), *args]


def test_a_peer_service_off_loopback_without_a_secret_is_refused(tmp_path: Path) -> None:
    args = torch_serve(tmp_path, "--peer-port", "0", "--set", "peer.host=0.0.0.0")
    line = assert_one_line_error(kvflow(*args, cwd=tmp_path), "peer.host='0.0.0.0'")
    assert "peer.secret" in line


def test_the_sim_engine_has_no_blocks_to_pull(tmp_path: Path) -> None:
    done = kvflow("serve", "--peers", "127.0.0.1:1", cwd=tmp_path)
    assert_one_line_error(done, "--peers", "--engine torch")


def test_a_malformed_peer_address_is_quoted(tmp_path: Path) -> None:
    done = kvflow(*torch_serve(tmp_path, "--peers", "127.0.0.1:1,localhost"), cwd=tmp_path)
    assert_one_line_error(done, "--peers", "'localhost'")


def test_a_missing_or_empty_secret_file_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-secret"
    done = kvflow(
        *torch_serve(tmp_path, "--peer-port", "0", "--peer-secret-file", str(missing)), cwd=tmp_path
    )
    assert_one_line_error(done, str(missing))
    empty = tmp_path / "empty-secret"
    empty.write_text("\n")
    done = kvflow(
        *torch_serve(tmp_path, "--peer-port", "0", "--peer-secret-file", str(empty)), cwd=tmp_path
    )
    assert_one_line_error(done, str(empty), "empty")


def test_peer_options_without_a_peer_service_are_refused(tmp_path: Path) -> None:
    done = kvflow(*torch_serve(tmp_path, "--model-id", "x"), cwd=tmp_path)
    assert_one_line_error(done, "--model-id", "--peer-port", "kv.disk.persist")
    secret = tmp_path / "secret"
    secret.write_text("s3cret\n")
    done = kvflow(*torch_serve(tmp_path, "--peer-secret-file", str(secret)), cwd=tmp_path)
    assert_one_line_error(done, "--peer-secret-file", "--peer-port")


def test_a_peer_listed_twice_is_refused(tmp_path: Path) -> None:
    # It was taken: two connections to one peer, both following it into one directory.
    peers = "127.0.0.1:9100,10.0.0.2:9100,127.0.0.1:9100"
    done = kvflow(*torch_serve(tmp_path, "--peers", peers), cwd=tmp_path)
    assert_one_line_error(done, "--peers", "'127.0.0.1:9100' twice")


def test_a_peer_port_in_use_is_an_error_naming_it(tmp_path: Path) -> None:
    # It was "the engine failed: OSError: [Errno 98] ...", naming no flag.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = kvflow("serve", "--engine", "sim", "--peer-port", str(port), cwd=tmp_path)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("kvflow: error: ") and "engine failed" not in last, last
    assert f"--peer-port {port}" in last and "in use" in last, last


def test_a_peer_port_that_is_the_http_port_is_refused(tmp_path: Path) -> None:
    done = kvflow("serve", "--engine", "sim", "--port", "8123", "--peer-port", "8123", cwd=tmp_path)
    assert_one_line_error(done, "--peer-port 8123", "--port")
