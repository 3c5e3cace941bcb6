"""`kvflow policies`: every policy the registry can load, plugins included."""

from __future__ import annotations

import argparse

from rich.console import Console

from kvflow import policies


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("policies", help="list every policy the registry can load, plugins included")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace, console: Console) -> int:
    for name in policies.names():
        source = policies.registry.source(name)
        try:
            factory = policies.load(name)
            doc = (factory.__doc__ or "").strip().splitlines()
            summary = doc[0] if doc else ""
        except Exception as err:  # a broken plugin is listed with its error, not fatal
            summary = f"(fails to load: {type(err).__name__}: {err})"
        console.print(f"{name:<14} {source:<10} {summary}", highlight=False, soft_wrap=True)
    return 0
