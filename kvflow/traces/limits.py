"""How large a trace may be: checked before any token is built.

Readers do not know the scheduler's `max_model_len`, so each length a record gives
(prompt, prefix, output, input/context/generated tokens, a Mooncake record's hash ids
times their block size) is checked against `MAX_TRACE_TOKENS`, a cap far above any
model's context; the scheduler then rejects requests longer than `max_model_len` as
usual. A length over the cap, negative, fractional, or not a number is an error naming
file, line and field and quoting the value.

The cap bounds one record; a file of many records under it could still ask for more
memory than there is. Prompts are tuples of token ids (8 bytes a token: the int objects
themselves are shared), built when the trace is read, so each reader adds up its
records' prompt tokens first and `check_total` refuses a file whose requests and prompts
would not fit in the RAM available, before building any.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from kvflow.traces.errors import FieldError, TraceFormatError

MAX_TRACE_TOKENS = 2**24
"""Most tokens (16,777,216) one length of one trace record may give."""

BYTES_PER_PROMPT_TOKEN = 8
"""Memory a prompt token takes once read: one slot of a tuple of shared int objects."""

BYTES_PER_REQUEST = 1024
"""Memory a request takes once read, besides its prompt's tokens: its `Request` and
record (~600 bytes measured on CPython 3.11), with room for the replay's own state."""


def check_length(field_name: str, value: object, shown: str, minimum: int = 1) -> int:
    """`value`, if it is an int in [minimum, MAX_TRACE_TOKENS]; else `FieldError`.

    Args:
        field_name: the field, as the file names it.
        value: the value read (an int when well formed; anything otherwise).
        shown: the value as the file spells it, for the message.
    """
    if type(value) is int and minimum <= value <= MAX_TRACE_TOKENS:
        return value
    raise FieldError(
        field_name,
        f"expected an integer in [{minimum}, {MAX_TRACE_TOKENS}] "
        f"(kvflow.traces.limits.MAX_TRACE_TOKENS), got {shown}",
    )


def check_total(path: str | os.PathLike[str], prompt_lengths: Iterable[int]) -> None:
    """Raise `TraceFormatError` naming `path` if prompts of these lengths would take
    more memory than is available (checked before they are built)."""
    from kvflow.kv.capacity import available_ram_bytes, human_bytes

    lengths = list(prompt_lengths)
    num_tokens = sum(lengths)
    needed = num_tokens * BYTES_PER_PROMPT_TOKEN + len(lengths) * BYTES_PER_REQUEST
    available = available_ram_bytes()
    if needed > available:
        raise TraceFormatError(
            f"{path}: its {len(lengths)} requests with {num_tokens} prompt tokens in all "
            f"need {human_bytes(needed)} of RAM once read; {human_bytes(available)} RAM "
            "available"
        )
