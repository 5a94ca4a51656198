"""Shared fixtures: the emoji-mini shards, a tiny model config, and a local Ray cluster."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cmaclip.config import ModelConfig
from cmaclip.data.emoji import build_emoji

FIXTURE = Path(__file__).parent / "fixtures" / "emoji-mini"


@pytest.fixture(scope="session")
def emoji_shards(tmp_path_factory) -> Path:
    """The real emoji-mini subset, built into shards once per session."""
    out = tmp_path_factory.mktemp("emoji-mini-shards")
    build_emoji(out, sources=[FIXTURE / "google", FIXTURE / "twitter"])
    return out


@pytest.fixture
def tiny_model_config() -> ModelConfig:
    """The demo's architecture; small enough to build in a fraction of a second."""
    return ModelConfig.model_validate(
        {"clip": {"name": "cmaclip-tiny"}, "width": 128, "layers": 1, "heads": 4, "dropout": 0.0}
    )


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """A local two-CPU Ray cluster, with token authentication as Ray sets it up locally."""
    import ray

    home = tmp_path_factory.mktemp("cmaclip-home")
    os.environ["CMACLIP_HOME"] = str(home)
    os.environ["RAY_DATA_DISABLE_PROGRESS_BARS"] = "1"
    # a cluster of its own, even when a head started by `make ray-up` is running
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=True)
    yield home
    ray.shutdown()
    os.environ.pop("CMACLIP_HOME", None)
