"""BurstGPT traces (HPMLL/BurstGPT): CSV of ChatGPT and GPT-4 requests on Azure.

Header ``Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type`` (names
matched without regard to case, spaces or underscores; only ``Timestamp``, ``Request
tokens`` and ``Response tokens`` are read, other columns such as ``Session ID`` are
ignored). ``Timestamp`` is seconds from the start of the collection.

Failed requests have 0 response tokens: they are left out and counted (kept, with 1
output token, under ``keep_failed``, since their prompts still loaded the service).
Rows with 0 request tokens are left out and counted. Prompts get their own synthesised
tokens (no prefix information), arrivals are seconds after the first request, and
request ids are ``r{i}``, i the 0-based index of the data row.
"""

from __future__ import annotations

from pathlib import Path

from kvflow.request import Request
from kvflow.traces.formats._io import CSVRows, parse_int, parse_seconds
from kvflow.traces.formats.azure import csv_prompt, output_len_or_drop
from kvflow.traces.formats.base import LoadLog, TraceFormat, TraceHead, TraceOptions, rebase

COLUMNS = ("Timestamp", "Request tokens", "Response tokens")


class BurstGPTFormat(TraceFormat):
    """BurstGPT CSV; failed responses left out unless kept."""

    name = "burstgpt"
    summary = "BurstGPT CSV (Timestamp s, Model, Request tokens, Response tokens, ...)"

    def sniff(self, head: TraceHead) -> bool:
        return {"timestamp", "requesttokens", "responsetokens"} <= set(head.csv_columns)

    def read(self, path: Path, options: TraceOptions, log: LoadLog) -> list[Request]:
        rows: list[tuple[str, float, int, int]] = []
        for index, (line_no, row) in enumerate(CSVRows(path, log, COLUMNS)):
            try:
                arrival = parse_seconds(row["Timestamp"], "Timestamp")
                num_in = parse_int(row["Request tokens"], "Request tokens")
                num_out = parse_int(row["Response tokens"], "Response tokens")
            except ValueError as err:
                log.bad(line_no, err)
                continue
            if num_in == 0:
                log.drop("0 request tokens")
                continue
            num_out = output_len_or_drop(num_out, options, log, "failed (0 response tokens)")
            if num_out:
                rows.append((f"r{index}", arrival, num_in, num_out))
        namespace = options.namespace_of(path)
        arrivals = rebase([r[1] for r in rows])
        return [
            Request(
                request_id=rid,
                prompt_token_ids=csv_prompt(namespace, rid, num_in),
                max_new_tokens=num_out,
                arrival_time=arrival,
            )
            for (rid, _, num_in, num_out), arrival in zip(rows, arrivals, strict=True)
        ]
