"""Two Ray nodes on one machine (ray.cluster_utils.Cluster): replicas spread over both nodes, a
node lost under load costs at most 1% of requests, the app returns to full strength when a node
comes back, and the bulk-index job runs image actors on both nodes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[1]


def test_two_nodes_spread_survive_a_node_loss_and_share_the_index_job(tmp_path):
    # Its own process: this needs a fresh multi-node Ray, not the session's local instance.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled"}
    # Without HAProxy even when the fast HTTP path's variable is exported: HAProxy listens on
    # fixed ports (the HTTP port, its stats and metrics ports), and the simulated nodes share
    # this machine's address with each other and with the session's test service, so a second
    # HAProxy fails to listen. Real nodes (machines, pods) each have their own address; the
    # scenario tests spreading and node loss, not the proxy.
    env.pop("RAY_SERVE_ENABLE_HA_PROXY", None)
    run = subprocess.run([sys.executable, str(ROOT / "tests" / "multinode_scenario.py"),
                          str(tmp_path)], capture_output=True, text=True, timeout=900, env=env,
                         cwd=ROOT)
    lines = [x for x in run.stdout.splitlines() if x.startswith("RESULT ")]
    assert run.returncode == 0 and lines, run.stderr[-3000:]
    found = json.loads(lines[-1][len("RESULT "):])
    assert found["image_encoder_nodes_before"] == 2
    assert found["requests"] > 100
    assert found["failed"] <= 0.01 * found["requests"], found
    assert found["seconds_to_full_strength"] < 180
    assert found["job_indexed"] == 24 and found["job_image_actor_nodes"] == 2, found
