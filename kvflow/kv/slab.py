"""The disk tier's slab file: its header, and opening and removing it without harm.

A slab starts with a `HEADER_BYTES` header; block `slot` lives at
`data_offset + slot * bytes_per_block`. The header says the file is kvflow's (magic),
which format version wrote it, and the layout of its blocks (block shape, dtype, bytes
per block, number of blocks), with an xxh3 checksum over those fields:

| offset | size | field |
| --- | --- | --- |
| 0 | 8 | magic `b"\\x89KVSLAB\\n"` |
| 8 | 4 | format version: 1, or 2 for a persistent slab |
| 12 | 4 | data offset: where block 0 starts |
| 16 | 4 | flags (bit 0: per-block records follow the header; version 2) |
| 20 | 4 | bytes of a per-block record (0 in version 1, 32 in version 2) |
| 24 | 8 | number of blocks |
| 32 | 8 | bytes per block |
| 40 | 20 | block shape: 5 x u32 (layers, 2, block size, kv heads, head dim) |
| 60 | 16 | dtype name, ASCII, zero padded |
| 76 | 32 | model fingerprint (version 2: 16 bytes, zero padded; version 1: zeros) |
| 108 | 8 | xxh3-64 of bytes 0..108 |

All integers little-endian; the rest of the header is zeros. Version 1 (`kv.disk.persist`
off) keeps the block index in memory only: block 0 starts at `HEADER_BYTES`, and a
slab's blocks are never reused across runs. Version 2 (`kv.disk.persist` on) puts one
32-byte record per block after the header (`kvflow.kv.persist` describes it), block 0
at the next page boundary after them, and the fingerprint of the model and layout
(`kvflow.kv.fingerprint`) in the header: a slab of another model is refused like one
of another layout.

Safety (what `open_slab` promises): kvflow writes only to a file it created (with
`O_EXCL`) or to an existing slab whose header matches the layout; it never opens a path
that is not a regular file (a symlink, directory, FIFO, device, socket), never follows a
symlink, and refuses, before opening anything for writing, a regular file without a
valid header or with another layout. `remove_slab` unlinks only a file this process
created, and only while the path still names that very file.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import struct
from dataclasses import dataclass
from math import prod
from pathlib import Path

import xxhash

from kvflow.config import ConfigError, KVConfig
from kvflow.kv.fingerprint import FINGERPRINT_SIZE

MAGIC = b"\x89KVSLAB\n"
"""The first bytes of every slab (a high first byte: no text file starts with it)."""
FORMAT_VERSION = 1
PERSISTENT_VERSION = 2
"""The format version of a slab with per-block records (`kv.disk.persist`)."""
HEADER_BYTES = 4096
"""The header's size, a page: block data stays page aligned."""
RECORD_BYTES = 32
"""One block's record in a persistent slab (`kvflow.kv.persist`)."""
_FLAG_RECORDS = 1

_FIELDS = struct.Struct("<8sIIIIQQ5I16s32s")
_CHECKSUM = struct.Struct("<Q")
_ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}
_KEY = "kv.disk.path"
_OPEN_FLAGS = os.O_NOFOLLOW | os.O_NOCTTY | os.O_CLOEXEC | os.O_NONBLOCK


class SlabPathError(ConfigError):
    """`kv.disk.path` names something kvflow must not write to; names the key and path."""


@dataclass(frozen=True, slots=True)
class SlabLayout:
    """What a slab's bytes mean: `num_blocks` blocks of `block_shape` in `dtype`."""

    block_shape: tuple[int, int, int, int, int]
    dtype: str
    num_blocks: int
    fingerprint: bytes | None = None
    """The model fingerprint of a persistent slab (version 2); None: version 1."""

    @classmethod
    def of(cls, config: KVConfig, num_blocks: int, fingerprint: bytes | None = None) -> SlabLayout:
        layout = config.layout
        shape = (layout.num_layers, 2, config.block_size, layout.num_kv_heads, layout.head_dim)
        return cls(shape, layout.dtype, num_blocks, fingerprint)

    @property
    def persistent(self) -> bool:
        return self.fingerprint is not None

    @property
    def data_offset(self) -> int:
        """Where block 0 starts: after the header, and the records rounded up to a page."""
        if not self.persistent:
            return HEADER_BYTES
        records = -(-self.num_blocks * RECORD_BYTES // HEADER_BYTES) * HEADER_BYTES
        return HEADER_BYTES + records

    @property
    def bytes_per_block(self) -> int:
        return prod(self.block_shape) * _ITEMSIZE[self.dtype]

    @property
    def file_bytes(self) -> int:
        """The slab's size: header and blocks."""
        return self.data_offset + self.num_blocks * self.bytes_per_block

    def header(self) -> bytes:
        persistent = self.fingerprint is not None
        fields = _FIELDS.pack(
            MAGIC,
            PERSISTENT_VERSION if persistent else FORMAT_VERSION,
            self.data_offset,
            _FLAG_RECORDS if persistent else 0,
            RECORD_BYTES if persistent else 0,
            self.num_blocks,
            self.bytes_per_block,
            *self.block_shape,
            self.dtype.encode("ascii"),
            (self.fingerprint or b"").ljust(32, b"\0"),
        )
        head = fields + _CHECKSUM.pack(xxhash.xxh3_64_intdigest(fields))
        return head.ljust(HEADER_BYTES, b"\0")

    def __str__(self) -> str:
        shape = "x".join(map(str, self.block_shape))
        text = f"{self.num_blocks} blocks of {shape} {self.dtype}"
        if self.fingerprint is None:
            return text
        return f"{text}, persistent, model fingerprint {self.fingerprint.hex()}"


def read_layout(header: bytes) -> SlabLayout | str:
    """The layout a slab header describes, or why `header` is not one kvflow can use."""
    if not header.startswith(MAGIC):
        return "not a kvflow slab (no slab header)"
    end = _FIELDS.size + _CHECKSUM.size
    if len(header) < end:
        return "a kvflow slab with a truncated header"
    fields = header[: _FIELDS.size]
    (checksum,) = _CHECKSUM.unpack_from(header, _FIELDS.size)
    if xxhash.xxh3_64_intdigest(fields) != checksum:
        return "a kvflow slab with a damaged header (bad checksum)"
    _, version, data_offset, flags, record_bytes, num_blocks, _, *shape, dtype, fp = _FIELDS.unpack(
        fields
    )
    if version == FORMAT_VERSION and (flags, record_bytes) == (0, 0):
        fingerprint = None
    elif version == PERSISTENT_VERSION and (flags, record_bytes) == (_FLAG_RECORDS, RECORD_BYTES):
        fingerprint = fp[:FINGERPRINT_SIZE]
    else:
        return (
            f"a kvflow slab of format version {version} (this kvflow reads "
            f"{FORMAT_VERSION} and {PERSISTENT_VERSION})"
        )
    name = dtype.rstrip(b"\0").decode("ascii", errors="replace")
    if name not in _ITEMSIZE:
        return f"a kvflow slab of unknown dtype {name!r}"
    found = SlabLayout(
        (shape[0], shape[1], shape[2], shape[3], shape[4]), name, num_blocks, fingerprint
    )
    if data_offset != found.data_offset:
        return f"a kvflow slab with a data offset of {data_offset} (expected {found.data_offset})"
    return found


def _refuse(path: Path, problem: str, remedy: str = "remove it yourself") -> SlabPathError:
    return SlabPathError(
        f"{_KEY}={str(path)!r}: {problem}; kvflow leaves it alone: {remedy} or choose another path"
    )


def _kind(mode: int) -> str:
    kinds = (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    )
    return next((name for test, name in kinds if test(mode)), "not a regular file")


def _describe_other(path: Path, st: os.stat_result) -> str:
    if stat.S_ISLNK(st.st_mode):
        try:
            target = os.readlink(path)
        except OSError:
            target = "?"
        return f"is a symbolic link (to {target!r}); kvflow does not follow links there"
    return f"is {_kind(st.st_mode)}, not a kvflow slab file"


def check_slab_path(path: Path, layout: SlabLayout) -> int:
    """Whether kvflow may use `path` as the slab of `layout`, without writing anything:
    it does not exist, or it is a regular file holding a slab of this layout.

    Returns:
        The bytes the existing slab already occupies on disk (0 when there is none).

    Raises:
        SlabPathError: naming the key and path, and what is there.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return 0
    except OSError as err:
        raise _refuse(path, f"cannot be checked ({err.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        raise _refuse(path, _describe_other(path, st))
    fd = _open_existing(path, st, os.O_RDONLY)
    try:
        _check_header(path, fd, layout)
    finally:
        os.close(fd)
    return int(st.st_blocks) * 512


def open_slab(path: Path, layout: SlabLayout) -> tuple[int, bool]:
    """Open (creating it if absent) the slab of `layout` at `path` for reading and
    writing, locked against other processes.

    Returns:
        (file descriptor, whether this call created the file).

    Raises:
        SlabPathError: `path` is not a slab kvflow may use (see `check_slab_path`), it is
            in use by another process, or its directory cannot be made.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise _refuse(path, f"its directory cannot be made ({err.strerror})") from None
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | _OPEN_FLAGS, 0o600)
    except FileExistsError:  # also for any symlink there, dangling or not
        return _reuse(path, layout), False
    except OSError as err:
        raise _refuse(path, f"cannot be created ({err.strerror})") from None
    try:
        os.set_blocking(fd, True)
        _lock(path, fd)
        os.pwrite(fd, layout.header(), 0)
    except BaseException:
        _unlink_if_same(path, fd)
        os.close(fd)
        raise
    return fd, True


def _reuse(path: Path, layout: SlabLayout) -> int:
    check_slab_path(path, layout)  # refuses anything but a slab of this layout
    st = os.lstat(path)
    fd = _open_existing(path, st, os.O_RDWR)
    try:
        _lock(path, fd)
        _check_header(path, fd, layout)  # again: it may have changed before the lock
    except BaseException:
        os.close(fd)
        raise
    return fd


def _open_existing(path: Path, st: os.stat_result, mode: int) -> int:
    """Open the regular file `lstat` saw as `st`, never following a link, and make sure
    the file opened is that one (the path may have been replaced in between)."""
    if not stat.S_ISREG(st.st_mode):
        raise _refuse(path, _describe_other(path, st))
    try:
        fd = os.open(path, mode | _OPEN_FLAGS)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise _refuse(path, "became a symbolic link while being checked") from None
        raise _refuse(path, f"cannot be opened ({err.strerror})") from None
    opened = os.fstat(fd)
    if not stat.S_ISREG(opened.st_mode) or (opened.st_dev, opened.st_ino) != (
        st.st_dev,
        st.st_ino,
    ):
        os.close(fd)
        raise _refuse(path, "changed while being checked")
    os.set_blocking(fd, True)
    return fd


def _check_header(path: Path, fd: int, layout: SlabLayout) -> None:
    found = read_layout(os.pread(fd, HEADER_BYTES, 0))
    if isinstance(found, str):
        size = os.fstat(fd).st_size
        raise _refuse(path, f"is a regular file of {size} bytes, {found}")
    if found != layout:
        raise _refuse(path, f"is a kvflow slab of another layout ({found}; this config: {layout})")


def _lock(path: Path, fd: int) -> None:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise _refuse(path, "is a slab in use by another process", "stop that one") from None


def _unlink_if_same(path: Path, fd: int) -> None:
    """Unlink `path` if it still names the file open as `fd` (call before closing `fd`,
    so that its inode cannot be reused meanwhile)."""
    opened = os.fstat(fd)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if (st.st_dev, st.st_ino) == (opened.st_dev, opened.st_ino):
        path.unlink(missing_ok=True)


def remove_slab(path: Path, fd: int) -> None:
    """Remove the slab this process created and still holds open as `fd` (see
    `_unlink_if_same`); anything else now at `path` is left alone."""
    _unlink_if_same(path, fd)
