"""Epoch time of the `warmup` stage with and without the tokens cache, in one run, same data.

    python benchmarks/cache_warmup.py --model runs/emoji-demo --data data/emoji

Both fits are the stage as a run trains it: one Ray Train worker with the config's scaling,
starting from the same checkpoint (a run folder's contrastive checkpoint), for the same number
of epochs. The uncached fit streams and decodes the shards with Ray Data and runs the encoders
every step; the cached fit reads the cache, built first (its build time is reported apart, as
it is paid once). Epoch seconds come from the stage's own per-epoch metrics, via MLflow.
Results go to benchmarks/results/cache_warmup.json with the machine's load alongside.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.machine import machine_facts  # noqa: E402
from cmaclip import tracking  # noqa: E402
from cmaclip.config import load_config, resolve_path  # noqa: E402
from cmaclip.data.shards import read_dataset_info  # noqa: E402
from cmaclip.export import input_spec, load_model  # noqa: E402
from cmaclip.training.cache import build_cache, check_cache, resolve_checkpoint  # noqa: E402
from cmaclip.training.run import _datasets, select_tasks, stage_trainer  # noqa: E402

logger = logging.getLogger("benchmarks.cache_warmup")
ROOT = Path(__file__).resolve().parent.parent


def _fit(config, *, tasks, datasets, init, train_rows, cache_dir, uri, run_id) -> float:
    trainer = stage_trainer(
        config, "warmup", tasks=tasks, datasets=datasets, init_weights=init,
        train_rows=train_rows, storage=config.storage_path(),
        name="cached" if cache_dir else "uncached", mlflow={"uri": uri, "run_id": run_id},
        cache_dir=cache_dir,
    )  # fmt: skip
    started = time.perf_counter()
    trainer.fit()
    return time.perf_counter() - started


def _history(uri: str, run_id: str, name: str) -> list[float]:
    from mlflow.tracking import MlflowClient

    points = MlflowClient(uri).get_metric_history(run_id, name)
    return [point.value for point in sorted(points, key=lambda p: p.step)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="runs/emoji-demo", help="run folder or checkpoint")
    parser.add_argument("--data", default="data/emoji")
    parser.add_argument("--config", default="configs/emoji.yaml")
    parser.add_argument("--cache", default="data/cache/bench-warmup-tokens")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/cache_warmup.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("cmaclip").setLevel(logging.INFO)
    logger.setLevel(logging.INFO)

    import ray

    config = load_config(
        args.config,
        [f"data.path={args.data}", f"stages.warmup.epochs={args.epochs}",
         "run.name=bench-cache-warmup"],
    )  # fmt: skip
    data_dir = config.data_path()
    info = read_dataset_info(data_dir)
    tasks = select_tasks(config, info)
    init = resolve_checkpoint(args.model, "tokens")
    load_before = os.getloadavg()
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False)

    # the cache, built once (or reused when it matches the checkpoint and data)
    cache_dir = resolve_path(args.cache)
    build_seconds = None
    try:
        manifest = check_cache(cache_dir, stage="warmup", weights=init, data_dir=data_dir,
                               tasks=tasks)  # fmt: skip
    except (FileNotFoundError, ValueError):
        started = time.perf_counter()
        manifest = build_cache(init, data_dir, "tokens", cache_dir, threads=os.cpu_count() or 1)
        build_seconds = round(time.perf_counter() - started, 1)

    uri = tracking.tracking_uri(config.tracking.tracking_uri)
    parent = tracking.start_run(uri, "cmaclip-benchmarks", "cache_warmup")
    model, _ = load_model(init)
    spec = input_spec(model)
    del model

    results = {}
    for mode in ("uncached", "cached"):
        run_id = tracking.start_run(uri, "cmaclip-benchmarks", mode, parent_id=parent)
        logger.info("warmup %s: %d epochs", mode, args.epochs)
        seconds = _fit(
            config, tasks=tasks, init=init, train_rows=int(info["rows"]["train"]),
            datasets={} if mode == "cached" else _datasets(config, spec),
            cache_dir=cache_dir if mode == "cached" else None, uri=uri, run_id=run_id,
        )  # fmt: skip
        tracking.end_run(uri, run_id)
        epochs = _history(uri, run_id, "epoch_seconds")
        results[mode] = {
            "epoch_seconds": [round(s, 1) for s in epochs],
            "mean_epoch_seconds": round(statistics.mean(epochs), 1),
            "fit_seconds": round(seconds, 1),
            "val_loss": [round(v, 4) for v in _history(uri, run_id, "val_loss")],
            "val_macro_accuracy": [round(v, 4) for v in _history(uri, run_id, "score")],
        }
        logger.info("warmup %s: %s", mode, results[mode])
    tracking.end_run(uri, parent)
    ray.shutdown()

    speedup = results["uncached"]["mean_epoch_seconds"] / results["cached"]["mean_epoch_seconds"]
    rows = sum(manifest["rows"].values())
    report = {
        "benchmark": "cache_warmup",
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": machine_facts(load_before),
        "data": {"path": str(data_dir), "rows": rows, "train_rows": manifest["rows"]["train"]},
        "stage": {
            "epochs": args.epochs,
            "batch_size": config.stages["warmup"].batch_size,
            "layers": config.model.layers,
            "width": config.model.width,
            "cpus_per_worker": config.scaling.cpus_per_worker,
            "torch_threads": config.scaling.torch_threads,
        },  # fmt: skip
        "cache": {
            "level": "tokens",
            "bytes": manifest["bytes"],
            "rows": rows,
            "text_length": manifest["text_length"],
            "gib_per_million_rows": manifest["gib_per_million_rows"],
            "build_seconds": build_seconds,
        },  # fmt: skip
        **results,
        "speedup_mean_epoch": round(speedup, 2),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
