"""kvflow's own JSON-lines format (see `kvflow.traces.native` for the schema)."""

from __future__ import annotations

from pathlib import Path

from kvflow.request import Request
from kvflow.traces.formats.base import LoadLog, TraceFormat, TraceHead, TraceOptions
from kvflow.traces.limits import check_total
from kvflow.traces.native import FORMAT_NAME, read_native

_NATIVE_KEYS = frozenset({"arrival_s", "output_len", "prompt_len", "prompt_token_ids"})


class NativeFormat(TraceFormat):
    """kvflow JSON lines: explicit token ids, or lengths with shared prefix groups."""

    name = "native"
    summary = "kvflow JSON lines (arrival_s, prompt_token_ids or prompt_len, output_len)"

    def sniff(self, head: TraceHead) -> bool:
        first = head.first_json
        if isinstance(first, dict):
            return first.get("format") == FORMAT_NAME or bool(_NATIVE_KEYS & first.keys())
        return not head.first_line and head.suffix == ".jsonl"  # empty: an empty trace

    def read(self, path: Path, options: TraceOptions, log: LoadLog) -> list[Request]:
        records = read_native(path, log)
        check_total(path, [record.num_prompt_tokens for record in records])
        return [record.to_request() for record in records]
