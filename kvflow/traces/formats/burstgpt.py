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

from kvflow.traces.formats._csv import CSVFormat, parse_seconds


class BurstGPTFormat(CSVFormat):
    """BurstGPT CSV; failed responses left out unless kept."""

    name = "burstgpt"
    summary = "BurstGPT CSV (Timestamp s, Model, Request tokens, Response tokens, ...)"
    columns = ("Timestamp", "Request tokens", "Response tokens")
    no_prompt_reason = "0 request tokens"
    no_output_reason = "failed (0 response tokens)"

    def parse_time(self, text: str) -> float:
        return parse_seconds(text, "Timestamp")
