"""One registry for built-ins and entry-point plugins, imported lazily."""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from importlib.metadata import EntryPoint, entry_points
from typing import Generic, TypeVar

T = TypeVar("T")


class UnknownNameError(KeyError):
    """An unknown name; the message lists the known ones."""

    def __str__(self) -> str:
        return str(self.args[0])


class PluginLoadError(ImportError):
    """A plugin's entry point that cannot be loaded (its module fails to import, or does
    not have the name); the message names the plugin and says why."""


class Registry(Generic[T]):
    """Names to objects, from `module:attr` paths of built-ins and from the
    entry-point group `group`. Nothing is imported until `load`."""

    def __init__(self, kind: str, group: str, builtins: Mapping[str, str]) -> None:
        self.kind = kind
        self.group = group
        self._builtins = dict(builtins)
        self._loaded: dict[str, T] = {}

    def _plugins(self) -> dict[str, EntryPoint]:
        return {ep.name: ep for ep in entry_points(group=self.group)}

    def names(self) -> list[str]:
        """Built-in names first, then plugins, each group sorted."""
        plugins = sorted(n for n in self._plugins() if n not in self._builtins)
        return [*self._builtins, *plugins]

    def source(self, name: str) -> str:
        """Where a name comes from: 'built-in' or the plugin's distribution and target."""
        if name in self._builtins:
            return "built-in"
        ep = self._plugins().get(name)
        if ep is None:
            raise self._unknown(name)
        dist = ep.dist.name if ep.dist is not None else "?"
        return f"plugin {dist} ({ep.value})"

    def load(self, name: str) -> T:
        if name in self._loaded:
            return self._loaded[name]
        if name in self._builtins:
            module, _, attr = self._builtins[name].partition(":")
            obj: T = getattr(importlib.import_module(module), attr)
        else:
            ep = self._plugins().get(name)
            if ep is None:
                raise self._unknown(name)
            try:
                obj = ep.load()
            except Exception as err:  # any error of third-party code, as one line
                raise PluginLoadError(
                    f"{self.kind} {name!r} ({self.source(name)}) fails to load: "
                    f"{type(err).__name__}: {err}"
                ) from err
        self._loaded[name] = obj
        return obj

    def _unknown(self, name: str) -> UnknownNameError:
        known = ", ".join(self.names())
        return UnknownNameError(f"unknown {self.kind} {name!r}; known: {known}")
