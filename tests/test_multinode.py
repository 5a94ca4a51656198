"""A training stage across a real two-node Ray cluster on this machine.

Two raylets (Ray's own `cluster_utils.Cluster`: a head and one worker node, each with its own
object store), one Ray Train worker on each, and a storage path both reach, as a shared file
system would be on a real cluster.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from cmaclip.config import load_config
from cmaclip.training.run import train

CONFIGS = Path(__file__).parent.parent / "configs"
NODE = {"num_cpus": 3, "object_store_memory": 512 * 1024**2}

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    import ray
    from ray.cluster_utils import Cluster

    home = tmp_path_factory.mktemp("cmaclip-multinode")
    os.environ["CMACLIP_HOME"] = str(home)
    os.environ["RAY_DATA_DISABLE_PROGRESS_BARS"] = "1"

    # a dashboard port of its own (the state API below goes through it), whatever else runs here
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dashboard_port = probe.getsockname()[1]
    head = {**NODE, "include_dashboard": True, "dashboard_port": dashboard_port}
    cluster = Cluster(initialize_head=True, head_node_args=head)
    worker_node = cluster.add_node(**NODE)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=True)
    yield home, cluster.address, {cluster.head_node.node_id, worker_node.node_id}

    ray.shutdown()
    cluster.shutdown()
    os.environ.pop("CMACLIP_HOME", None)


def test_a_stage_trains_with_one_worker_on_each_node(two_nodes, emoji_shards, tmp_path):
    import ray
    from ray.util.state import list_actors

    home, address, node_ids = two_nodes
    assert len({node["NodeID"] for node in ray.nodes() if node["Alive"]}) == 2
    storage = tmp_path / "shared-storage"

    # 2 CPUs a worker on 3-CPU nodes: no node can hold both workers, so Ray must spread them
    config = load_config(
        CONFIGS / "emoji.yaml",
        [
            f"data.path={emoji_shards}",
            "run.name=two-nodes",
            f"run.storage_path={storage}",
            "scaling.num_workers=2",
            "scaling.cpus_per_worker=2",
            "scaling.torch_threads=1",
            "data.preprocess_cpus=0.25",
            "model.layers=1",
            "stages.contrastive.enabled=false",
            "stages.warmup.epochs=1",
            "stages.end_to_end.enabled=false",
            "stages.tuning.enabled=false",
        ],
    )
    report = train(config)

    workers = list_actors(
        address=address, filters=[("class_name", "=", "RayTrainWorker")], detail=True
    )
    assert {actor.node_id for actor in workers} == node_ids

    # the stage's checkpoint went through the shared storage path, and the run finished
    assert list((storage / "warmup").rglob("model.safetensors"))
    assert (config.run_dir() / "model" / "model.safetensors").is_file()
    assert report["rows_used"] + report["rows_skipped"] == report["rows_read"]
    assert report["rows_used"] > 0
