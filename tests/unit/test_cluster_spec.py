"""What `kvflow cluster up` gives each instance: its serve arguments by role, and the
peer services it pulls from (every instance runs one: the router follows its events)."""

from __future__ import annotations

from kvflow.cluster.launcher import ClusterSpec, peer_args

ARGS = ("--engine", "torch")


def test_instances_pull_from_every_other_instance() -> None:
    spec = ClusterSpec(("instance",) * 3, ARGS, pull_from_peers=True)
    assert [spec.pulls_from(i) for i in range(3)] == [[1, 2], [0, 2], [0, 1]]
    assert spec.instance_args("instance") == ["serve", *ARGS]


def test_a_pd_split_pulls_prefill_from_prefill_and_decode_from_prefill() -> None:
    spec = ClusterSpec(("prefill", "prefill", "decode", "decode"), ARGS, pull_from_peers=True)
    assert [spec.pulls_from(i) for i in range(4)] == [[1], [0], [0, 1], [0, 1]]
    assert spec.instance_args("decode") == ["serve", *ARGS, "--role", "decode"]


def test_without_pulls_each_instance_still_runs_a_peer_service() -> None:
    spec = ClusterSpec(("instance",) * 2, ("--engine", "sim"))
    assert [spec.pulls_from(i) for i in range(2)] == [[], []]
    assert peer_args(4100, []) == ["--peer-port", "4100"]
    assert peer_args(4100, ["127.0.0.1:4101", "127.0.0.1:4102"]) == [
        "--peer-port", "4100", "--peers", "127.0.0.1:4101,127.0.0.1:4102",
    ]  # fmt: skip
