"""The engines carrying a `KVStore`'s copies: its own, and the remote tier's once a pull
went through it (real pulls from peers, which run on the caller's event loop)."""

from __future__ import annotations

from kvflow.kv.transfer import CopyEngine, Transfer


class EnginePair:
    """The store's copy engine and, once set, the remote tier's pull engine, asked as one.

    Args:
        engine: the store's own engine (`KVStore.engine`).
    """

    def __init__(self, engine: CopyEngine) -> None:
        self.engine = engine
        self.pull_engine: CopyEngine | None = None
        """The remote tier's engine, once a pull went through it (real pulls)."""

    def completed(self, now: float) -> list[tuple[Transfer, list[bool]]]:
        """The copies both engines finished by `now` (the store's own first)."""
        done = self.engine.completed(now)
        if self.pull_engine is not None:
            done += self.pull_engine.completed(now)
        return done

    def next_completion(self) -> float | None:
        """When the next copy finishes in virtual time (None if none or unknown)."""
        t = self.engine.next_completion()
        if self.pull_engine is None:
            return t
        t_pull = self.pull_engine.next_completion()
        return t_pull if t is None else t if t_pull is None else min(t, t_pull)

    def wait(self, timeout_s: float | None = None) -> None:
        """Block until a copy finishes (real copy engines)."""
        pulls = self.pull_engine
        if pulls is not None and pulls.num_pending and not self.engine.num_pending:
            pulls.wait(timeout_s)  # only pulls in flight: wait for them, not spin
        else:
            self.engine.wait(timeout_s)

    def close_pulls(self) -> None:
        """Give up the pulls in flight (closing their engine fails them)."""
        if self.pull_engine is not None:
            self.pull_engine.close()
