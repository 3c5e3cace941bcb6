"""A third-party policy package, installed for real, found through entry points."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

PLUGIN_PYPROJECT = """\
[project]
name = "kvflow-test-plugin"
version = "0.1"

[project.entry-points."kvflow.policies"]
newest-first = "kvflow_test_plugin:NewestFirst"
by-factory = "kvflow_test_plugin:make"
not-a-policy = "kvflow_test_plugin:make_wrong"
fails-to-build = "kvflow_test_plugin:make_raising"
fails-to-import = "kvflow_test_plugin.broken:Policy"
names-nothing = "kvflow_test_plugin:NoSuchPolicy"

[project.entry-points."kvflow.routers"]
last-instance = "kvflow_test_plugin:LastInstance"

[build-system]
requires = ["setuptools"]
build-backend = "setuptools.build_meta"
"""

PLUGIN_MODULE = '''\
"""A policy that admits the newest request first."""
from kvflow.policies import Policy


class NewestFirst(Policy):
    """Admits the most recent arrival first."""

    def order(self, waiting, view):
        return sorted(waiting, key=lambda r: -r.arrival_time)


def make(**options):
    """A factory returning an instance."""
    return NewestFirst()


def make_wrong(**options):
    return object()


def make_raising(**options):
    raise RuntimeError("needs a GPU cluster")


from kvflow.cluster.routers import Router


class LastInstance(Router):
    """Sends every request to the highest-numbered instance."""

    def route(self, request, view):
        return view.num_instances - 1
'''

BROKEN_MODULE = '''"""A plugin module that cannot be imported."""
import kvflow_no_such_dependency  # noqa: F401
'''


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("plugin")
    pkg = root / "src"
    (pkg / "kvflow_test_plugin").mkdir(parents=True)
    (pkg / "pyproject.toml").write_text(PLUGIN_PYPROJECT)
    (pkg / "kvflow_test_plugin" / "__init__.py").write_text(PLUGIN_MODULE)
    (pkg / "kvflow_test_plugin" / "broken.py").write_text(BROKEN_MODULE)
    site = root / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(site),
            str(pkg),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    return site


def _kvflow(site: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(site), env.get("PYTHONPATH", "")])
    return subprocess.run(
        [sys.executable, "-m", "kvflow", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def test_plugin_policies_are_listed_beside_builtins(plugin_site: Path) -> None:
    out = _kvflow(plugin_site, "policies")
    assert out.returncode == 0, out.stderr
    for name in ("fcfs", "lpm", "edf", "priority", "fair", "newest-first", "by-factory"):
        assert name in out.stdout
    assert "kvflow-test-plugin" in out.stdout


def test_plugin_class_and_factory_run_in_replay(plugin_site: Path, tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    out = _kvflow(
        plugin_site,
        "replay",
        "--policy",
        "newest-first",
        "--policy",
        "by-factory",
        "--json",
        str(report),
    )
    assert out.returncode == 0, out.stderr
    runs = {r["policy"]: r for r in json.loads(report.read_text())["runs"]}
    assert set(runs) == {"newest-first", "by-factory"}
    for run in runs.values():
        assert run["num_finished"] + run["num_rejected"] == run["num_requests"] > 0
        assert run["num_leaked_blocks"] == 0


def test_a_plugin_returning_a_non_policy_is_a_clear_error(plugin_site: Path) -> None:
    out = _kvflow(plugin_site, "replay", "--policy", "not-a-policy")
    assert out.returncode == 2
    assert "not-a-policy" in out.stderr and "not a kvflow.policies.Policy" in out.stderr


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("fails-to-import", "No module named 'kvflow_no_such_dependency'"),
        ("names-nothing", "NoSuchPolicy"),
        ("fails-to-build", "RuntimeError: needs a GPU cluster"),
    ],
)
def test_a_broken_plugin_is_a_one_line_error_naming_it(
    plugin_site: Path, name: str, reason: str
) -> None:
    out = _kvflow(plugin_site, "replay", "--policy", "fcfs", "--policy", name)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kvflow: error: "), out.stderr
    assert f"policy {name!r}" in lines[0] and "kvflow-test-plugin" in lines[0]
    assert reason in lines[0]
    assert "fcfs" not in out.stdout  # failed before replaying anything


def test_broken_plugins_are_listed_with_their_errors(plugin_site: Path) -> None:
    out = _kvflow(plugin_site, "policies")
    assert out.returncode == 0, out.stderr
    assert "fails-to-import" in out.stdout and "fails to load" in out.stdout


def test_plugin_router_runs_a_fleet(plugin_site: Path, tmp_path: Path) -> None:
    report = tmp_path / "fleet.json"
    out = _kvflow(
        plugin_site, "replay", "--instances", "3", "--router", "last-instance",
        "--limit", "30", "--json", str(report),
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    run = json.loads(report.read_text())["runs"][0]
    assert run["fleet"]["router"] == "last-instance"
    assert run["fleet"]["routed_requests"] == [0, 0, 30]
