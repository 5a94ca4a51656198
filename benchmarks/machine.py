"""What a benchmark's JSON says of the machine it ran on; shared by the benchmark scripts."""

from __future__ import annotations

import os
import platform

import torch


def machine_facts(load_before: tuple[float, float, float]) -> dict:
    """CPUs, platform, torch and the load average before and now: the noise beside a ratio."""
    return {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
    }
