"""Load on the HTTP service against the raw speed of the same encoder and heads in one process.

    python benchmarks/serve_load.py --model runs/emoji-demo/model --data data/emoji
    python benchmarks/serve_load.py --config configs/vit-b-32.yaml --data data/emoji \\
        --torch-threads 2 --out benchmarks/results/serve_load_vit_b_32.json

The script starts the Serve application on a local Ray, then for each client count starts a
second process that keeps that many concurrent HTTP clients busy for `--seconds` and reports
QPS, latency percentiles and status counts. Beside it, the same encoder and heads run in this
process on ready-made batches of `--batch-size` items (no HTTP, no Ray): the raw throughput that
the service's batched throughput is compared with. Both use `--torch-threads` threads.

With `--config` instead of `--model`, the model is the config's architecture with fresh weights
(nothing is downloaded): the serving cost of a model before it is trained.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import logging
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

logger = logging.getLogger("serve_load")


def _sample_bodies(data_dir: Path, count: int) -> list[dict]:
    """Request bodies from the first rows of the test split: title plus base64 image."""
    import pyarrow.parquet as pq

    from cmaclip.data.shards import shard_files

    bodies = []
    for path in shard_files(data_dir, "test"):
        for row in pq.read_table(path, columns=["title", "image"]).to_pylist():
            bodies.append({"title": row["title"], "image": base64.b64encode(row["image"]).decode()})
            if len(bodies) == count:
                return bodies
    return bodies


def _untrained_model(config_path: Path, data_dir: Path, folder: Path) -> Path:
    from cmaclip.config import load_config
    from cmaclip.data.shards import read_dataset_info
    from cmaclip.export import save_model
    from cmaclip.model.cmaclip import CMACLIP

    config = load_config(config_path, ["model.clip.pretrained=null"])
    model = CMACLIP(config.model, read_dataset_info(data_dir)["tasks"])
    return save_model(model, folder / "model", {"run": f"untrained-{config_path.stem}"})


def raw_throughput(model_dir: Path, bodies: list[dict], batch_size: int, seconds: float) -> dict:
    """Items per second of encoder + every head on prepared batches, in this process."""
    import torch

    from cmaclip.export import load_model
    from cmaclip.predict import ItemPreparer, TaskScorer

    model, meta = load_model(model_dir)
    scorers = [TaskScorer.from_folder(model_dir, task) for task in meta["tasks"]]
    preparer = ItemPreparer(meta["input"])

    started = time.perf_counter()
    prepared = [
        preparer.prepare(b["title"], base64.b64decode(b["image"])) for b in bodies[:batch_size]
    ]
    prepare_seconds = (time.perf_counter() - started) / len(prepared)
    while len(prepared) < batch_size:
        prepared += prepared[: batch_size - len(prepared)]
    images = torch.from_numpy(np.stack([p.image for p in prepared]))
    text = torch.from_numpy(np.stack([p.text for p in prepared]))

    def step() -> None:
        with torch.no_grad():
            image_embedding, text_embedding = model.embed(images, text)
            for scorer in scorers:
                scorer(image_embedding, text_embedding)

    step()  # warm-up
    batches, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds or batches < 3:
        step()
        batches += 1
    elapsed = time.perf_counter() - started
    items_per_second = batches * batch_size / elapsed
    return {
        "batch_size": batch_size,
        "batches": batches,
        "seconds": round(elapsed, 2),
        "items_per_second": round(items_per_second, 2),
        "prepare_ms_per_item": round(prepare_seconds * 1000, 3),
    }


async def _drive(url: str, bodies: list[dict], clients: int, seconds: float) -> dict:
    import aiohttp

    latencies: list[float] = []
    statuses: Counter[str] = Counter()
    deadline = time.perf_counter() + seconds

    async def client(index: int, session: aiohttp.ClientSession) -> None:
        n = index
        while time.perf_counter() < deadline:
            body = bodies[n % len(bodies)]
            n += clients
            sent = time.perf_counter()
            try:
                async with session.post(f"{url}/v1/classify", json=body) as response:
                    await response.read()
                    statuses[str(response.status)] += 1
            except aiohttp.ClientError as error:
                statuses[type(error).__name__] += 1
                continue
            latencies.append(time.perf_counter() - sent)

    timeout = aiohttp.ClientTimeout(total=600)
    connector = aiohttp.TCPConnector(limit=clients)
    started = time.perf_counter()
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        await asyncio.gather(*(client(i, session) for i in range(clients)))
    elapsed = time.perf_counter() - started

    ok = statuses.get("200", 0)
    p50, p95, p99 = (
        np.percentile(latencies, q) * 1000 if latencies else None for q in (50, 95, 99)
    )
    return {
        "clients": clients,
        "seconds": round(elapsed, 2),
        "requests": sum(statuses.values()),
        "ok": ok,
        "qps": round(ok / elapsed, 2),
        "p50_ms": p50 and round(p50, 1),
        "p95_ms": p95 and round(p95, 1),
        "p99_ms": p99 and round(p99, 1),
        "statuses": dict(statuses),
        "errors_5xx": sum(n for status, n in statuses.items() if status.startswith("5")),
        "errors_other": sum(n for status, n in statuses.items() if not status.isdigit()),
    }


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _load_from_second_process(url: str, bodies_file: Path, clients: int, seconds: float) -> dict:
    command = [sys.executable, __file__, "--drive", url, "--bodies", str(bodies_file),
               "--clients", str(clients), "--seconds", str(seconds)]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="exported model folder")
    parser.add_argument("--config", type=Path, help="or a training config: its untrained model")
    parser.add_argument("--data", type=Path, help="shard folder; items come from its test split")
    parser.add_argument("--clients", default="1,8,32", help="comma-separated client counts")
    parser.add_argument("--seconds", type=float, default=60.0, help="load time per client count")
    parser.add_argument("--batch-size", type=int, default=32, help="encoder batch, raw and served")
    parser.add_argument("--torch-threads", type=int, default=1)
    parser.add_argument("--raw-seconds", type=float, default=20.0, help="raw timing length")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/serve_load.json"))
    parser.add_argument("--drive", help=argparse.SUPPRESS)  # the load process: the service URL
    parser.add_argument("--bodies", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.drive:
        bodies = json.loads(args.bodies.read_text())
        result = asyncio.run(_drive(args.drive, bodies, int(args.clients), args.seconds))
        print(json.dumps(result))
        return

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    import ray
    import torch
    from ray import serve

    from cmaclip.serving import ENCODER_APP, run_local, serve_environment

    torch.set_num_threads(args.torch_threads)
    scratch = tempfile.TemporaryDirectory()
    if args.config:
        args.model = _untrained_model(args.config, args.data, Path(scratch.name))
    bodies = _sample_bodies(args.data, 256)
    logger.info("raw in-process throughput at batch %d ...", args.batch_size)
    raw = raw_throughput(args.model, bodies, args.batch_size, seconds=args.raw_seconds)
    logger.info("raw: %s", raw)

    # the service as `cmaclip serve` runs it (HAProxy in front), in a cluster of its own
    environment = serve_environment(own_haproxy=True)
    os.environ.update(environment)
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    options = {"model": str(args.model), "max_batch_size": args.batch_size,
               "torch_threads": args.torch_threads}  # fmt: skip
    url = run_local(options, port=_free_port())

    with tempfile.TemporaryDirectory() as folder:
        bodies_file = Path(folder) / "bodies.json"
        bodies_file.write_text(json.dumps(bodies))
        _load_from_second_process(url, bodies_file, 4, 5)  # warm-up: replicas, caches, JIT paths

        encoder = serve.get_deployment_handle("Encoder", ENCODER_APP)
        runs = []
        for clients in (int(c) for c in args.clients.split(",")):
            before = encoder.stats.remote().result()
            logger.info("%d clients for %gs ...", clients, args.seconds)
            run = _load_from_second_process(url, bodies_file, clients, args.seconds)
            after = encoder.stats.remote().result()
            batches = {s: after.get(s, 0) - before.get(s, 0) for s in after}
            total = sum(batches.values())
            run["encoder_mean_batch"] = round(sum(s * n for s, n in batches.items()) / total, 2)
            run["ratio_to_raw"] = round(run["qps"] / raw["items_per_second"], 3)
            logger.info("%s", run)
            runs.append(run)
        encoder_peak_mib = encoder.peak_memory_mib.remote().result()
    serve.shutdown()
    ray.shutdown()

    result = {
        "benchmark": "serve_load",
        "date": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, no GPU",
        "model": str(args.config or args.model),
        "torch_threads": args.torch_threads,
        "haproxy": environment["RAY_SERVE_ENABLE_HA_PROXY"] == "1",
        "raw_in_process": raw,
        "served": runs,
        # after every client count; requests hold no state, so it does not grow with the
        # number of rows a catalog has, only with batch size and model
        "encoder_replica_peak_rss_mib": round(encoder_peak_mib, 1),
    }
    scratch.cleanup()
    shutil.rmtree(environment["RAY_SERVE_HAPROXY_SERVER_STATE_BASE"], ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    logger.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
