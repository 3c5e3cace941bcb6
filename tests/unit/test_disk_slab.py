"""The disk tier never destroys what it did not create: what is at `kv.disk.path` before
kvflow runs is either a kvflow slab of the same layout or left exactly as it was."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from kvflow.config import ConfigError, KVConfig, KVFlowConfig
from kvflow.kv.storage import byte_view
from kvflow.kv.store import KVStore
from tests.builders import make_scheduler

LAYOUT = {"num_layers": 2, "num_kv_heads": 2, "head_dim": 4, "dtype": "float32"}


def kv_config(path: Path, **layout: object) -> KVConfig:
    return KVFlowConfig.from_dict(
        {
            "kv": {
                "block_size": 4,
                "device": {"num_blocks": 4},
                "cpu": {"num_blocks": 4},
                "disk": {"num_blocks": 8, "path": str(path)},
                "layout": {**LAYOUT, **layout},
            }
        }
    ).kv


def snapshot(path: Path) -> tuple[int, bytes | list[str] | str | None]:
    """What is at `path`, as lstat and its content see it (not following links)."""
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        return st.st_mode, os.readlink(path)
    if stat.S_ISDIR(st.st_mode):
        return st.st_mode, sorted(os.listdir(path))
    if stat.S_ISREG(st.st_mode):
        return st.st_mode, path.read_bytes()
    return st.st_mode, None


def a_document(tmp: Path) -> Path:
    doc = tmp / "notes.txt"
    doc.write_text("my thesis, chapter 3\n" * 100)
    return doc


def a_directory(tmp: Path) -> Path:
    folder = tmp / "data"
    folder.mkdir()
    (folder / "keep.txt").write_text("keep")
    return folder


def a_fifo(tmp: Path) -> Path:
    fifo = tmp / "pipe"
    os.mkfifo(fifo)
    return fifo


def a_link_to_a_file(tmp: Path) -> Path:
    link = tmp / "link.slab"
    link.symlink_to(a_document(tmp))
    return link


def a_link_to_a_directory(tmp: Path) -> Path:
    link = tmp / "dirlink"
    link.symlink_to(a_directory(tmp))
    return link


def a_link_to_dev_null(tmp: Path) -> Path:
    link = tmp / "null"
    link.symlink_to("/dev/null")
    return link


def a_dangling_link(tmp: Path) -> Path:
    link = tmp / "dangling.slab"
    link.symlink_to(tmp / "nowhere" / "target.slab")
    return link


def an_empty_file(tmp: Path) -> Path:
    empty = tmp / "empty.slab"
    empty.touch()
    return empty


KINDS: dict[str, Callable[[Path], Path]] = {
    "document": a_document,
    "directory": a_directory,
    "fifo": a_fifo,
    "link-to-file": a_link_to_a_file,
    "link-to-directory": a_link_to_a_directory,
    "link-to-dev-null": a_link_to_dev_null,
    "dangling-link": a_dangling_link,
    "empty-file": an_empty_file,
}


@pytest.mark.parametrize("kind", list(KINDS))
def test_a_real_store_refuses_what_is_not_a_slab_and_leaves_it_as_it_was(
    tmp_path: Path, kind: str
) -> None:
    path = KINDS[kind](tmp_path)
    before = {p: snapshot(p) for p in sorted(tmp_path.rglob("*"))}
    with pytest.raises(ConfigError, match=r"kv\.disk\.path") as err:
        store = KVStore.with_tensors(kv_config(path))
        store.close()  # unchanged code got here: close it the way a run does
    message = str(err.value)
    assert str(path) in message and "\n" not in message
    after = {p: snapshot(p) for p in sorted(tmp_path.rglob("*"))}
    assert after == before  # nothing changed, nothing created, nothing removed
    assert not (tmp_path / "nowhere").exists()


def test_dev_null_itself_is_refused_before_it_is_opened() -> None:
    before = os.lstat("/dev/null")
    with pytest.raises(ConfigError, match=r"kv\.disk\.path='/dev/null': is a character device"):
        KVStore.with_tensors(kv_config(Path("/dev/null")))
    after = os.lstat("/dev/null")
    assert stat.S_ISCHR(after.st_mode) and after.st_rdev == before.st_rdev


@pytest.mark.parametrize("kind", ["document", "directory", "fifo", "dangling-link"])
def test_the_simulator_refuses_the_same_paths(tmp_path: Path, kind: str) -> None:
    path = KINDS[kind](tmp_path)
    before = snapshot(path)
    with pytest.raises(ConfigError, match=r"kv\.disk\.path"):
        make_scheduler(
            **{"kv.disk.path": str(path), "kv.cpu.num_blocks": 4, "kv.disk.num_blocks": 8}
        )
    assert snapshot(path) == before


def test_a_slab_kvflow_created_is_removed_at_close_and_one_it_found_is_kept(
    tmp_path: Path,
) -> None:
    path = tmp_path / "kv.slab"
    first = KVStore.with_tensors(kv_config(path))
    assert first.disk_storage is not None and first.disk_storage.created
    first.close()
    assert not path.exists()  # created by this process: removed

    # A slab left behind (a crashed run, or close(remove=False)) is kvflow's own: reused.
    left = KVStore.with_tensors(kv_config(path))
    assert left.disk_storage is not None
    left.engine.close()
    left.disk_storage.close(remove=False)
    reused = KVStore.with_tensors(kv_config(path))
    disk = reused.disk_storage
    assert disk is not None and not disk.created
    block = torch.arange(disk.bytes_per_block // 4, dtype=torch.float32)
    assert disk.write_from(byte_view(block), [0], [5]) == [True]
    back = torch.zeros_like(block)
    assert disk.read_into([5], byte_view(back), [0]) == [True]
    assert torch.equal(back, block)
    reused.close()
    assert path.exists()  # it was there before this store: kept
    assert path.stat().st_size == disk.layout.file_bytes


def test_a_slab_of_another_layout_is_refused_naming_both(tmp_path: Path) -> None:
    path = tmp_path / "kv.slab"
    store = KVStore.with_tensors(kv_config(path))
    assert store.disk_storage is not None
    store.engine.close()
    store.disk_storage.close(remove=False)
    before = path.read_bytes()
    with pytest.raises(ConfigError, match="another layout") as err:
        KVStore.with_tensors(kv_config(path, num_layers=3))
    message = str(err.value)
    assert "8 blocks of 2x2x4x2x4 float32" in message
    assert "8 blocks of 3x2x4x2x4 float32" in message
    assert path.read_bytes() == before


def test_a_slab_in_use_by_another_store_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "kv.slab"
    store = KVStore.with_tensors(kv_config(path))
    with pytest.raises(ConfigError, match="in use by another process") as err:
        KVStore.with_tensors(kv_config(path))
    # Removing it would take a persistent slab from the process using it.
    assert "remove it" not in str(err.value) and "choose another path" in str(err.value)
    store.close()
    assert not path.exists()


def test_close_leaves_a_file_that_replaced_the_slab_alone(tmp_path: Path) -> None:
    path = tmp_path / "kv.slab"
    store = KVStore.with_tensors(kv_config(path))
    doc = a_document(tmp_path)
    os.replace(doc, path)  # someone put their own file at the path meanwhile
    store.close()
    assert path.read_text().startswith("my thesis")


def test_a_damaged_slab_header_is_not_kvflows(tmp_path: Path) -> None:
    path = tmp_path / "kv.slab"
    store = KVStore.with_tensors(kv_config(path))
    assert store.disk_storage is not None
    store.engine.close()
    store.disk_storage.close(remove=False)
    with open(path, "r+b") as f:
        f.seek(40)
        f.write(b"\xff")
    before = path.read_bytes()
    with pytest.raises(ConfigError, match="damaged header"):
        KVStore.with_tensors(kv_config(path))
    assert path.read_bytes() == before


def test_block_data_starts_after_the_header(tmp_path: Path) -> None:
    from kvflow.kv.slab import HEADER_BYTES, MAGIC, read_layout

    store = KVStore.with_tensors(kv_config(tmp_path / "kv.slab"))
    disk = store.disk_storage
    assert disk is not None
    block = torch.full((disk.bytes_per_block // 4,), 7.0)
    assert disk.write_from(byte_view(block), [0], [2]) == [True]
    raw = disk.path.read_bytes()
    assert raw.startswith(MAGIC) and read_layout(raw[:HEADER_BYTES]) == disk.layout
    at = disk.block_offset(2)
    assert at == HEADER_BYTES + 2 * disk.bytes_per_block
    assert raw[at : at + disk.bytes_per_block] == block.numpy().tobytes()
    store.close()
