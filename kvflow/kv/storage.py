"""Where a tier's block bytes live: torch tensor pools and a checksummed slab file.

Every tier holds blocks of one layout, `(num_layers, 2, block_size, num_kv_heads,
head_dim)`, so a pool is one tensor of shape `(num_blocks, *block_shape)` and a block
is one contiguous slice of it; the disk tier stores the same bytes at
`data_offset + slot * bytes_per_block` in a preallocated slab file (`kvflow.kv.slab`:
its header, and how kvflow opens it without harming what it did not create). torch is
imported only here, and only when real storage is built: the simulator never needs it.
"""

from __future__ import annotations

import errno
import itertools
import os
import threading
import uuid
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import xxhash

from kvflow.config import ConfigError, KVConfig
from kvflow.kv.capacity import check_disk_room
from kvflow.kv.fingerprint import model_fingerprint
from kvflow.kv.persist import Recovered, pack_record, record_offset, recover
from kvflow.kv.slab import (
    PERSISTENT_VERSION,
    SlabLayout,
    check_slab_path,
    open_slab,
    remove_slab,
)

if TYPE_CHECKING:
    import torch

_IOV_MAX = os.sysconf("SC_IOV_MAX")


def block_shape(config: KVConfig) -> tuple[int, int, int, int, int]:
    layout = config.layout
    return (layout.num_layers, 2, config.block_size, layout.num_kv_heads, layout.head_dim)


def torch_dtype(name: str) -> torch.dtype:
    import torch

    dtypes: dict[str, torch.dtype] = {
        "float16": torch.float16,
        "bfloat16": torch.bfloat16,
        "float32": torch.float32,
        "float64": torch.float64,
    }
    return dtypes[name]


class TensorStorage:
    """A preallocated tensor pool, `data[slot]` being one block."""

    def __init__(self, data: torch.Tensor) -> None:
        self.data = data
        self.num_blocks = int(data.shape[0])

    @classmethod
    def allocate(
        cls, config: KVConfig, num_blocks: int, device: str | torch.device, pin: bool = False
    ) -> TensorStorage:
        import torch

        data = torch.zeros(
            (num_blocks, *block_shape(config)),
            dtype=torch_dtype(config.layout.dtype),
            device=device,
            pin_memory=pin and torch.cuda.is_available(),
        )
        return cls(data)


def byte_view(tensor: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, without copying. A view of a whole pool is
    made once: slicing it costs a fraction of what slicing the tensor does."""
    import torch

    array: Any = tensor.view(torch.uint8).numpy()
    return memoryview(array).cast("B")


class DiskStorage:
    """A slab file of `layout.num_blocks` blocks with an xxh3 checksum per written block.

    Opening refuses a path that is not a slab kvflow may use (`kvflow.kv.slab.open_slab`);
    `close` removes the file only if this process created it and it is not persistent.
    A persistent slab (`layout.fingerprint` set) gets a record per written block
    (`kvflow.kv.persist`) and, when it existed, its good blocks are in `recovered`.

    Reads verify the checksum: a mismatch, a short read or an I/O error makes the block
    a miss (`read_into` reports it), never bad data. A full disk disables the tier.
    """

    def __init__(
        self, path: Path, layout: SlabLayout, fsync: bool = False, verify_on_start: bool = True
    ) -> None:
        self.path = path
        self.layout = layout
        self.num_blocks = layout.num_blocks
        self.bytes_per_block = layout.bytes_per_block
        self.data_offset = layout.data_offset
        """Where block 0 starts in the file (after the slab header and any records)."""
        self.fsync = fsync
        self.checksums: list[int | None] = [None] * layout.num_blocks
        self.disabled_reason: str | None = None
        self.num_errors = 0
        self._errors_lock = threading.Lock()
        self.fd, self.created = open_slab(path, layout)
        """`created`: this process made the file, so `close` may remove it."""
        self.recovered = Recovered([], [], [], [], 1, 0)
        """The blocks a persistent slab held when opened (verified if `verify_on_start`)."""
        if layout.fingerprint is not None and not self.created:
            try:  # before preallocating: a truncated slab's missing blocks are seen
                self.recovered = recover(self.fd, layout, verify_on_start)
            except BaseException:
                self.close(remove=False)
                raise
            for slot, digest in zip(self.recovered.slots, self.recovered.digests, strict=True):
                self.checksums[slot] = digest
        self._generations = itertools.count(self.recovered.next_generation)
        preallocate = getattr(os, "posix_fallocate", None)  # absent on macOS
        try:
            if preallocate is not None:
                preallocate(self.fd, 0, layout.file_bytes)
            elif os.fstat(self.fd).st_size < layout.file_bytes:
                os.ftruncate(self.fd, layout.file_bytes)  # sparse: a full disk shows later
        except OSError as err:
            self._disable(f"cannot preallocate {layout.file_bytes} bytes: {err}")

    @classmethod
    def create(cls, config: KVConfig, num_blocks: int, model_id: str = "") -> DiskStorage:
        """The slab at `kv.disk.path` (default: a new file under the cache directory),
        after checking the path is safe to use and its file system has room for it.
        With `kv.disk.persist`, a persistent slab keyed by the fingerprint of `model_id`
        and the layout, whose surviving blocks are recovered.

        Raises:
            SlabPathError: `kv.disk.path` is not a slab kvflow may use (or one of
                another layout or model).
            ConfigError: `kv.disk.persist` without a `model_id`.
            CapacityError: the file system lacks the room.
        """
        fingerprint = None
        if config.disk.persist:
            if not model_id:
                raise ConfigError(
                    "kv.disk.persist=true needs a model identity (set peer.model_id, or "
                    "`kvflow serve --model-id`, to the weights' name, path or digest): "
                    "blocks of different models must never mix in one slab"
                )
            fingerprint = model_fingerprint(config, model_id, PERSISTENT_VERSION)
        if config.disk.path is not None:
            path = Path(config.disk.path).expanduser()
        else:
            base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "kvflow"
            path = base / f"kv-{os.getpid()}-{uuid.uuid4().hex[:8]}.slab"
        layout = SlabLayout.of(config, num_blocks, fingerprint)
        existing_bytes = check_slab_path(path, layout)
        check_disk_room(config, path, layout.file_bytes - existing_bytes)
        return cls(path, layout, config.disk.fsync, config.disk.verify_on_start)

    def block_offset(self, slot: int) -> int:
        """Where block `slot` starts in the file."""
        return self.data_offset + slot * self.bytes_per_block

    @property
    def enabled(self) -> bool:
        return self.disabled_reason is None

    def _disable(self, reason: str) -> None:
        if self.disabled_reason is None:
            self.disabled_reason = reason
            warnings.warn(
                f"kvflow: disk tier {self.path} disabled: {reason}", RuntimeWarning, stacklevel=3
            )

    def write_from(
        self,
        src: memoryview,
        src_slots: Sequence[int],
        slots: Sequence[int],
        *,
        checksum: bool = True,
        keys: Sequence[int] | None = None,
        depths: Sequence[int] | None = None,
    ) -> list[bool]:
        """Write blocks `src_slots` of a host pool's bytes `src` (block i at
        `i * bytes_per_block`) to `slots`, one `pwritev` per run of consecutive slots,
        then fsync if configured; returns per-block success. A persistent slab also
        gets the blocks' records when their `keys` (and depths) are given (see
        `set_checksums`).

        With `checksum=False` the written blocks stay unreadable (a read is a miss) until
        `set_checksums` gives their digests, which `block_digests` can compute in another
        thread while this one writes.
        """
        digests = block_digests(src, src_slots, self.bytes_per_block) if checksum else None
        ok = [False] * len(slots)
        if not self.enabled:
            return ok
        for slot in slots:
            self.checksums[slot] = None  # stale until its write lands
        for lo, hi in _consecutive_runs(slots):
            if not self._write_run(src, src_slots, slots, lo, hi, ok):
                break  # the disk is full; what landed before is still synced below
        if self.fsync:
            os.fsync(self.fd)
        return ok if digests is None else self.set_checksums(slots, digests, ok, keys, depths)

    def _write_run(
        self,
        src: memoryview,
        src_slots: Sequence[int],
        slots: Sequence[int],
        lo: int,
        hi: int,
        ok: list[bool],
    ) -> bool:
        """Write the run `slots[lo:hi]`, carrying on after short writes (Linux writes at
        most 2 GiB - 4 KiB per call); marks landed blocks in `ok`. False if the disk is
        full."""
        size = self.bytes_per_block
        while lo < hi:
            views = [src[s * size : (s + 1) * size] for s in src_slots[lo:hi]]
            try:
                num_written = os.pwritev(self.fd, views, self.block_offset(slots[lo])) // size
            except OSError as err:
                self._count_error(hi - lo)
                if err.errno in (errno.ENOSPC, errno.EDQUOT):
                    self._disable(f"disk full ({err.strerror})")
                    return False
                return True
            if num_written == 0:
                self._count_error(hi - lo)
                return True
            ok[lo : lo + num_written] = [True] * num_written
            lo += num_written
        return True

    def set_checksums(
        self,
        slots: Sequence[int],
        digests: Sequence[int] | None,
        ok: list[bool],
        keys: Sequence[int] | None = None,
        depths: Sequence[int] | None = None,
    ) -> list[bool]:
        """Make the blocks whose write landed (`ok`) readable, checked against `digests`
        (None when they could not be computed: the blocks stay unreadable). In a
        persistent slab, first write the records of those blocks (with their `keys`, and
        `depths` in their chains when known: 0 otherwise; then fsync if configured): a
        block is reported written only once its bytes and its record are. Returns the
        per-block success of the whole write."""
        if digests is None:
            self._count_error(sum(ok))
            return [False] * len(ok)
        if keys is not None and self.layout.fingerprint is not None:
            depths = depths if depths is not None else [0] * len(keys)
            ok = self._write_records(slots, digests, ok, keys, depths, self.layout.fingerprint)
        checksums = self.checksums
        for slot, digest, good in zip(slots, digests, ok, strict=True):
            if good:
                checksums[slot] = digest
        return ok

    def _write_records(
        self,
        slots: Sequence[int],
        digests: Sequence[int],
        ok: list[bool],
        keys: Sequence[int],
        depths: Sequence[int],
        fingerprint: bytes,
    ) -> list[bool]:
        """Write the records of the landed blocks, one `pwrite` each (32 bytes; the
        data writes dominate); a block whose record fails to land fails."""
        ok = list(ok)
        records = zip(slots, digests, keys, depths, strict=True)
        for i, (slot, digest, key, depth) in enumerate(records):
            if not ok[i]:
                continue
            record = pack_record(fingerprint, key, digest, next(self._generations), depth)
            try:
                landed = os.pwrite(self.fd, record, record_offset(slot)) == len(record)
            except OSError:
                landed = False
            if not landed:
                ok[i] = False
                self._count_error()
        if self.fsync:
            os.fsync(self.fd)
        return ok

    def read_into(
        self,
        slots: Sequence[int],
        dst: memoryview,
        dst_slots: Sequence[int],
        *,
        nowait: bool = False,
    ) -> list[bool]:
        """Read `slots` into blocks `dst_slots` of a host pool's bytes `dst`; returns
        per-block success (a failed block holds garbage and must not be used). Each block
        is checksummed right after its read, while its bytes are still in cache.

        With `nowait`, reads only what the page cache holds and stops at the first block
        it does not wholly hold: the result is then shorter than `slots`, and the rest is
        for a thread that may block.
        """
        ok: list[bool] = []
        size = self.bytes_per_block
        fd = self.fd
        base = self.data_offset
        checksums = self.checksums
        digest = xxhash.xxh3_64_intdigest
        flags = 0
        if nowait:
            flags = getattr(os, "RWF_NOWAIT", 0)
            if not flags:  # not Linux: every read may block
                return ok
        for slot, d in zip(slots, dst_slots, strict=True):
            view = dst[d * size : (d + 1) * size]
            try:
                num_read = os.preadv(fd, [view], base + slot * size, flags)
            except OSError:
                if nowait:  # not cached (EAGAIN), or no RWF_NOWAIT here (EOPNOTSUPP: tmpfs)
                    break
                num_read = -1
            if num_read < size and nowait and num_read >= 0:
                break  # partly cached, or short: a blocking read tells which
            expected = checksums[slot]
            good = expected is not None and num_read == size and digest(view) == expected
            ok.append(good)
            if not good:
                self._count_error()
        return ok

    def _count_error(self, num_errors: int = 1) -> None:
        with self._errors_lock:  # reads of one transfer run in several threads
            self.num_errors += num_errors

    def close(self, remove: bool = True) -> None:
        """Close the slab; with `remove`, delete it if this process created it (a slab
        that was there before, or a persistent one, is left in place)."""
        if self.fd >= 0:
            if remove and self.created and self.layout.fingerprint is None:
                remove_slab(self.path, self.fd)
            os.close(self.fd)
            self.fd = -1


def block_digests(src: memoryview, src_slots: Sequence[int], bytes_per_block: int) -> list[int]:
    """xxh3 of blocks `src_slots` of a pool's bytes (the GIL is released while hashing)."""
    digest = xxhash.xxh3_64_intdigest
    size = bytes_per_block
    return [digest(src[s * size : (s + 1) * size]) for s in src_slots]


def _consecutive_runs(slots: Sequence[int]) -> list[tuple[int, int]]:
    """Index ranges [lo, hi) of `slots` that hold consecutive slots, at most `_IOV_MAX`
    long (the most buffers one `pwritev` takes)."""
    runs: list[tuple[int, int]] = []
    lo = 0
    for i in range(1, len(slots) + 1):
        if i == len(slots) or slots[i] != slots[i - 1] + 1 or i - lo == _IOV_MAX:
            runs.append((lo, i))
            lo = i
    return runs
