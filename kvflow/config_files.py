"""Reading what configures kvflow: config files, `--set key=value` overrides, the
config values a `sim.preset_file` carries, and validation errors as one line that
names the key and quotes the value. The models themselves are in `kvflow.config`."""

from __future__ import annotations

import json
import os
import stat
import tomllib
from pathlib import Path
from typing import Any

from pydantic import ValidationError


class ConfigError(ValueError):
    """An invalid configuration; the message names the key and quotes the value."""


MAX_SMALL_FILE_BYTES = 16 * 2**20
"""The most a config, preset or secret file may hold (they are read whole)."""


def read_small_file(path: Path, what: str, max_bytes: int = MAX_SMALL_FILE_BYTES) -> str:
    """The UTF-8 text of a small file read whole (a config file, a preset, a secret).

    Raises:
        ConfigError: naming `what` and the path: it cannot be read, is not a regular
            file (a device or FIFO would never end, or never answer), is larger than
            `max_bytes`, or is not UTF-8.
    """
    where = f"{what} {str(path)!r}"
    try:
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(f"{where} is not a regular file")
        with open(path, "rb") as file:
            data = file.read(max_bytes + 1)
    except OSError as err:
        raise ConfigError(f"cannot read {where}: {err.strerror or err}") from None
    if len(data) > max_bytes:
        raise ConfigError(f"{where} is larger than {max_bytes} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{where} is not UTF-8 text: {err}") from None


def read_config_file(path: Path) -> dict[str, Any]:
    text = read_small_file(path, "config file")
    try:
        if path.suffix == ".toml":
            data: Any = tomllib.loads(text)
        else:
            data = json.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as err:
        raise ConfigError(f"config file {str(path)!r} does not parse: {err}") from None
    except RecursionError:  # both parsers recurse once per level
        raise ConfigError(f"config file {str(path)!r} does not parse: nested too deeply") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a table/object at the top")
    return data


def parse_assignment(text: str) -> tuple[str, Any]:
    """`key=value` from the command line; the value is JSON when it parses, else a string."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set expects key=value, got {text!r}")
    try:
        value: Any = json.loads(raw)
    except ValueError:
        value = raw
    except RecursionError:
        raise ConfigError(f"--set {key.strip()}: the value nests too deeply") from None
    return key.strip(), value


def fill_from_preset_file(data: dict[str, Any]) -> None:
    """A `sim.preset_file` may carry `kv.transfer` values (`kvflow calibrate` writes
    the tier copy figures it measured there) and `sim.overlap` (true for a preset of
    the async engine): they fill in the keys the config leaves unset."""
    sim = data.get("sim")
    path = sim.get("preset_file") if isinstance(sim, dict) else None
    if not isinstance(path, str):
        return
    try:
        doc = json.loads(read_small_file(Path(path), "sim.preset_file"))
    except (ValueError, RecursionError):  # ConfigError is a ValueError
        # Reported where the simulator reads the preset's coefficients (the runner is
        # built), as before presets carried config values.
        return
    preset_sim = doc.get("sim") if isinstance(doc, dict) else None
    if isinstance(preset_sim, dict) and "overlap" in preset_sim and isinstance(sim, dict):
        sim.setdefault("overlap", preset_sim["overlap"])
    kv = doc.get("kv") if isinstance(doc, dict) else None
    transfer = kv.get("transfer") if isinstance(kv, dict) else None
    if transfer is None:
        return
    if not isinstance(transfer, dict):
        raise ConfigError(
            f"sim.preset_file={path!r}: kv.transfer must be an object, got {transfer!r}"
        )
    target = data.setdefault("kv", {})
    if isinstance(target, dict):
        section = target.setdefault("transfer", {})
        if isinstance(section, dict):
            for key, value in transfer.items():
                section.setdefault(key, value)


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"config key {key!r}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


def describe_validation_error(err: ValidationError) -> str:
    lines = []
    for item in err.errors():
        where = ".".join(str(p) for p in item["loc"]) or "config"
        if not where.isprintable():  # a key of a file may hold a newline: one line
            where = repr(where)
        if item["type"] == "extra_forbidden":
            lines.append(f"{where}: unknown key (value {item['input']!r})")
        elif item["type"] == "value_error":
            lines.append(item["msg"].removeprefix("Value error, "))
        else:
            lines.append(f"{where}={item['input']!r}: {item['msg']}")
    return "invalid config: " + "; ".join(lines)
