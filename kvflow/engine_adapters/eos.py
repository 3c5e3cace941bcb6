"""A checkpoint's end-of-sequence tokens, read as transformers and vLLM read them.

`eos_token_id` may be an int, a list of ints, or absent. `generation_config.json` (what
`generate` uses) wins over `config.json`; a checkpoint with neither has no EOS, and its
requests stop only at `max_new_tokens` or their own stop tokens.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def eos_token_ids_of(value: Any, where: str) -> tuple[int, ...]:
    """`eos_token_id` as a tuple of token ids (None gives ()).

    Raises:
        ValueError: not an int, a list of ints or None (naming `where`).
    """
    if value is None:
        return ()
    ids = [value] if isinstance(value, int) else value
    if (
        not isinstance(ids, list | tuple)
        or not ids
        or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids)
    ):
        raise ValueError(
            f"{where}: eos_token_id must be a token id or a list of them, got {value!r}"
        )
    return tuple(dict.fromkeys(ids))


def read_eos_token_ids(model_dir: str | Path) -> tuple[int, ...]:
    """The EOS tokens of a checkpoint directory: `generation_config.json`'s
    `eos_token_id` when it has one, else `config.json`'s, else ()."""
    for name in ("generation_config.json", "config.json"):
        path = Path(model_dir) / name
        if not path.is_file():
            continue
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise ValueError(f"cannot read {str(path)!r}: {err}") from None
        value = doc.get("eos_token_id") if isinstance(doc, dict) else None
        if value is not None:
            return eos_token_ids_of(value, str(path))
    return ()


def hf_eos_token_ids(model: Any) -> tuple[int, ...]:
    """The EOS tokens of a loaded transformers model: its generation config's, else its
    text config's."""
    generation = getattr(model, "generation_config", None)
    value = getattr(generation, "eos_token_id", None)
    if value is None:
        value = getattr(model.config.get_text_config(), "eos_token_id", None)
    return eos_token_ids_of(value, f"{type(model).__name__} config")


__all__ = ["eos_token_ids_of", "hf_eos_token_ids", "read_eos_token_ids"]
