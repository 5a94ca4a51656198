"""Training throughput, data-pipeline headroom and memory, each as a ratio taken in one run.

    python benchmarks/train_throughput.py --init runs/emoji-demo/checkpoints/warmup

Three fits of one `end_to_end` epoch from the same checkpoint, on the same shards, batch size
and torch threads:

- `plain`: one process, no Ray. Batches are read and preprocessed in that process (the same
  `Preprocessor` the Ray Data actors run) and trained with the loop's own `train_step`.
- `ray_1_worker`: the stage as a run trains it, one Ray Train worker fed by Ray Data.
- `ray_2_workers`: two workers on the same machine, one torch thread each (reported as is).

The Ray fits report, per epoch, their training seconds, the seconds the worker waited for its
next batch and its peak resident memory (the loop's own metrics); a thread here samples the
object store's use every half second. The pipeline's own rate is measured apart: the
`Preprocessor` alone, in this process, on one thread, over the whole training split.

Results go to benchmarks/results/train_throughput.json with the machine's load alongside.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psutil  # noqa: E402
import torch  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402
from open_clip.loss import ClipLoss  # noqa: E402

from benchmarks.machine import machine_facts  # noqa: E402
from cmaclip import tracking  # noqa: E402
from cmaclip.config import load_config, resolve_path  # noqa: E402
from cmaclip.data.pipeline import Preprocessor, local_batches, raw_batches  # noqa: E402
from cmaclip.data.shards import read_dataset_info  # noqa: E402
from cmaclip.export import input_spec, load_model, load_weights  # noqa: E402
from cmaclip.model.cmaclip import CMACLIP  # noqa: E402
from cmaclip.training.loop import (  # noqa: E402
    _lr_lambda,
    apply_speed_switches,
    make_optimizer,
    train_step,
)
from cmaclip.training.run import _datasets, _ensure_ray, select_tasks, stage_trainer  # noqa: E402

logger = logging.getLogger("benchmarks.train_throughput")
ROOT = Path(__file__).resolve().parent.parent
STAGE = "end_to_end"
EXPERIMENT = "cmaclip-benchmarks"


def plain_epoch(config, tasks, init: Path, threads: int) -> dict:
    """One epoch in this process: read, preprocess, train; no Ray anywhere."""
    torch.set_num_threads(threads)
    torch.manual_seed(config.run.seed)
    stage_config = config.stages[STAGE]
    model = CMACLIP(config.model, tasks)
    load_weights(model, init)
    params = model.set_stage(STAGE)
    model = apply_speed_switches(model, config.scaling).train()

    train_rows = int(read_dataset_info(config.data_path())["rows"]["train"])
    batch_size = stage_config.batch_size
    steps = max(1, train_rows // batch_size)
    optimizer = make_optimizer(params, stage_config)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _lr_lambda(stage_config.warmup_steps, steps * stage_config.epochs)
    )

    batches = local_batches(
        config.data_path(), "train", input_spec(model), batch_size=batch_size,
        max_skipped_fraction=config.data.max_skipped_fraction,
    )  # fmt: skip
    started = time.perf_counter()
    waited, rows, losses = 0.0, 0, []
    while True:
        asked = time.perf_counter()
        batch = next(batches, None)
        waited += time.perf_counter() - asked
        if batch is None:
            break
        if len(batch["valid"]) < batch_size:  # the loop drops a worker's last partial batch
            continue
        tensors = {key: torch.from_numpy(value) for key, value in batch.items()
                   if key in ("images", "text", "labels", "valid", "unknown_labels")}  # fmt: skip
        loss, used, skipped = train_step(
            model, tensors, stage=STAGE, optimizer=optimizer, schedule=schedule,
            clip_loss=ClipLoss(), cache_level=None, loss_weights=config.data.loss_weights,
            device=torch.device("cpu"), where=f"step {len(losses) + 1}",
            precision=config.scaling.precision, channels_last=config.scaling.channels_last,
        )  # fmt: skip
        rows += used + skipped
        losses.append(loss)
        if len(losses) % 50 == 0:
            logger.info("plain: step %d, %.1f samples/s", len(losses),
                        rows / (time.perf_counter() - started))  # fmt: skip
    seconds = time.perf_counter() - started
    return {
        "train_seconds": round(seconds, 2),
        "rows": rows,
        "steps": len(losses),
        "train_samples_per_s": round(rows / seconds, 2),
        "preprocess_seconds": round(waited, 2),
        "train_loss": round(sum(losses) / len(losses), 4),
        "peak_rss_mib": round(tracking.peak_rss_mib(), 1),
    }


def preprocess_rate(config, spec) -> dict:
    """Rows per second of the `Preprocessor` alone, one thread, whole training split."""
    torch.set_num_threads(1)
    preprocess = Preprocessor(spec, max_skipped_fraction=config.data.max_skipped_fraction)
    batches = list(raw_batches(config.data_path(), "train", spec.tasks, batch_size=64))
    started = time.perf_counter()
    rows = sum(len(preprocess(batch)["valid"]) for batch in batches)
    seconds = time.perf_counter() - started
    return {"rows": rows, "seconds": round(seconds, 2), "rows_per_s_per_cpu": round(rows / seconds)}


class Sampler:
    """Samples, every `every` seconds, the object store's bytes in use and each process's CPU.

    Ray has no public call for the store's use; this reads the raylet's memory summary, the
    numbers `ray memory --stats-only` prints. CPU seconds are kept per process as last seen, so
    that actors which exit before the end (a Ray Data epoch's actors) still count.
    """

    def __init__(self, every: float = 1.0):
        self.every, self.peak, self.samples = every, 0, 0
        self._cpu: dict[int, tuple[str, float]] = {}
        self._first_seen: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample_cpu(self) -> None:
        for process in psutil.process_iter(["name", "cmdline", "cpu_times"]):
            times = process.info["cpu_times"]
            if times is None:
                continue
            name = " ".join(process.info["cmdline"] or [])[:60] or process.info["name"]
            self._cpu[process.pid] = (name, times.user + times.system)

    def _run(self) -> None:
        import ray
        from ray._private.internal_api import get_memory_info_reply, get_state_from_address

        # this run's own cluster: another one on the machine would make the address ambiguous
        state = get_state_from_address(ray.get_runtime_context().gcs_address)
        while not self._stop.wait(self.every):
            self._sample_cpu()
            try:
                used = get_memory_info_reply(state).store_stats.object_store_bytes_used
            except Exception as error:  # a sample lost to a busy raylet is not a result
                logger.debug("object store sample failed: %s", error)
                continue
            self.peak, self.samples = max(self.peak, int(used)), self.samples + 1

    def cpu_seconds(self, top: int = 12) -> dict[str, dict[str, float]]:
        """CPU seconds used during the sampling and processes seen, per process name."""
        totals: dict[str, dict[str, float]] = {}
        for pid, (name, seconds) in self._cpu.items():
            entry = totals.setdefault(name.strip(), {"cpu_seconds": 0.0, "processes": 0})
            entry["cpu_seconds"] += seconds - self._first_seen.get(pid, 0.0)
            entry["processes"] += 1
        ranked = sorted(totals.items(), key=lambda item: -item[1]["cpu_seconds"])[:top]
        return {
            name: {"cpu_seconds": round(entry["cpu_seconds"], 1), "processes": entry["processes"]}
            for name, entry in ranked
        }

    def __enter__(self):
        self._sample_cpu()  # processes alive before count from here, later ones from zero
        self._first_seen = {pid: seconds for pid, (_, seconds) in self._cpu.items()}
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._sample_cpu()


def ray_fit(config, tasks, init: Path, spec, name: str, uri: str, parent: str) -> dict:
    """The stage through Ray Train and Ray Data, as `cmaclip train` runs it; per-epoch figures.

    The loop logs each epoch's metrics to MLflow, which is where they are read back from.
    """
    _ensure_ray(config)  # refuses a scaling that would leave Ray Data no CPU (it would hang)
    train_rows = int(read_dataset_info(config.data_path())["rows"]["train"])
    # a fit finds an earlier benchmark's checkpoint in its storage and would resume after it
    shutil.rmtree(config.storage_path() / name, ignore_errors=True)
    run_id = tracking.start_run(uri, EXPERIMENT, name, parent_id=parent)
    trainer = stage_trainer(
        config, STAGE, tasks=tasks, datasets=_datasets(config, spec), init_weights=init,
        train_rows=train_rows, storage=config.storage_path(), name=name,
        mlflow={"uri": uri, "run_id": run_id},
    )  # fmt: skip
    started = time.perf_counter()
    with Sampler() as sampler:
        trainer.fit()
    fit_seconds = time.perf_counter() - started
    tracking.end_run(uri, run_id)

    history = MlflowClient(uri)
    epochs = []
    keys = (
        "train_seconds",
        "train_samples_per_s",
        "data_wait_seconds",
        "data_wait_fraction",
        "data_first_batch_seconds",
        "train_loss",
        "worker_peak_rss_mib",
        "epoch_seconds",
    )
    for key in keys:
        points = sorted(history.get_metric_history(run_id, key), key=lambda point: point.step)
        for i, point in enumerate(points):
            if len(epochs) <= i:
                epochs.append({"epoch": i + 1})
            epochs[i][key] = round(point.value, 4 if "fraction" in key else 2)
    return {
        "workers": config.scaling.num_workers,
        "torch_threads": config.scaling.torch_threads,
        "cpus_per_worker": config.scaling.cpus_per_worker,
        "fit_seconds": round(fit_seconds, 1),
        "epochs": epochs,
        "worker_peak_rss_mib": max(epoch["worker_peak_rss_mib"] for epoch in epochs),
        # null, not 0, when no sample came back
        "object_store_peak_mib": round(sampler.peak / 2**20, 1) if sampler.samples else None,
        "object_store_samples": sampler.samples,
        "cpu_seconds_by_process": sampler.cpu_seconds(),
    }


# where a stack of the training thread belongs: the first of these found in one of its frames
PHASES = (
    ("around (", "waiting for the next batch"),
    ("_validate (", "validation"),
    ("_save_checkpoint (", "checkpoint and report"),
    ("report (", "checkpoint and report"),
    ("backward (", "backward"),
    ("torch/optim/", "AdamW and the learning-rate schedule"),
    ("train_step (", "forward and loss"),
)


def profile_fit(config, tasks, init: Path, spec) -> dict:
    """One more epoch through Ray Train with py-spy sampling the training worker at 50 Hz.

    Apart from the measured fits, since sampling slows the process it samples. Returns the
    training thread's time per phase and its five busiest functions; the raw stacks (about a
    megabyte) stay in the run folder, out of git.
    """
    train_rows = int(read_dataset_info(config.data_path())["rows"]["train"])
    shutil.rmtree(config.storage_path() / "profile", ignore_errors=True)
    trainer = stage_trainer(
        config, STAGE, tasks=tasks, datasets=_datasets(config, spec), init_weights=init,
        train_rows=train_rows, storage=config.storage_path(), name="profile",
    )  # fmt: skip
    stacks = config.run_dir() / "profile.pyspy.txt"
    stacks.parent.mkdir(parents=True, exist_ok=True)
    recorder: list[subprocess.Popen] = []

    def attach() -> None:  # py-spy follows the worker from its start until it exits
        while not recorder:
            for process in psutil.process_iter(["cmdline"]):
                if (process.info["cmdline"] or [""])[0].startswith("ray::RayTrainWorker"):
                    command = [shutil.which("py-spy") or "py-spy", "record", "--pid",
                               str(process.pid), "--rate", "50", "--format", "raw",
                               "--output", str(stacks)]  # fmt: skip
                    recorder.append(subprocess.Popen(command, stdout=subprocess.DEVNULL,
                                                     stderr=subprocess.DEVNULL))  # fmt: skip
                    return
            time.sleep(0.2)

    watcher = threading.Thread(target=attach, daemon=True)
    watcher.start()
    trainer.fit()
    if not recorder:
        return {"error": "the training worker was not found"}
    recorder[0].wait(timeout=60)
    if recorder[0].returncode != 0 or not stacks.is_file():
        return {"error": f"py-spy exited with {recorder[0].returncode} (it needs ptrace rights)"}
    return summarise_stacks(stacks)


def summarise_stacks(path: Path) -> dict:
    """The training thread's samples by phase, and its five busiest innermost functions."""
    phases: dict[str, int] = {}
    functions: dict[str, int] = {}
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        if not any(frame.startswith("train_stage (") for frame in frames):
            continue  # Ray's threads, and the worker's set-up before the stage
        total += int(count)
        phase = next(
            (name for marker, name in PHASES for frame in frames if marker in frame),
            "other",
        )
        phases[phase] = phases.get(phase, 0) + int(count)
        leaf = frames[-1].split(" (")[0] + " (" + frames[-1].rsplit("/", 1)[-1]
        functions[leaf] = functions.get(leaf, 0) + int(count)
    share = {name: round(n / max(total, 1), 3) for name, n in phases.items()}
    top = sorted(functions.items(), key=lambda item: -item[1])[:5]
    return {
        "samples": total,
        "stacks": str(path),
        "phases": dict(sorted(share.items(), key=lambda item: -item[1])),
        "top_functions": {name: round(n / max(total, 1), 3) for name, n in top},
    }


def plain_in_subprocess(args) -> dict:
    """The plain loop in a fresh process: no Ray in it, and its peak memory its own."""
    command = [sys.executable, __file__, "--plain-only", "--init", args.init, "--data",
               args.data, "--config", args.config,
               *(f"--set={item}" for item in args.set)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"the plain loop failed: {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _summary(results: dict) -> dict:
    """The ratios the README quotes, from one run's fits."""
    summary: dict = {}
    plain = statistics.mean(r["train_samples_per_s"] for r in results["plain"]) if results[
        "plain"] else None  # fmt: skip
    one, two = results.get("ray_1_worker"), results.get("ray_2_workers")
    if one:
        first, last = one["epochs"][0], one["epochs"][-1]
        if plain:
            # the first epoch pays for starting the data pipeline, once per stage
            summary["ray_over_plain"] = round(last["train_samples_per_s"] / plain, 3)
            summary["ray_over_plain_first_epoch"] = round(first["train_samples_per_s"] / plain, 3)
        summary["data_wait_fraction"] = last["data_wait_fraction"]
        summary["data_wait_fraction_first_epoch"] = first["data_wait_fraction"]
        summary["pipeline_headroom"] = round(
            results["preprocess"]["rows_per_s_per_cpu"] / last["train_samples_per_s"], 1
        )
        summary["worker_peak_rss_mib"] = one["worker_peak_rss_mib"]
        summary["object_store_peak_mib"] = one["object_store_peak_mib"]
    if one and two:
        summary["two_workers_over_one"] = round(
            two["epochs"][-1]["train_samples_per_s"] / one["epochs"][-1]["train_samples_per_s"], 3
        )
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--init", default="runs/emoji-demo/checkpoints/warmup",
                        help="checkpoint the end_to_end stage starts from")  # fmt: skip
    parser.add_argument("--data", default="data/emoji")
    parser.add_argument("--config", default="configs/emoji.yaml")
    parser.add_argument("--epochs", type=int, default=2, help="epochs of each Ray fit")
    parser.add_argument("--skip", nargs="*", default=[], choices=["plain", "ray1", "ray2"])
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for every fit (data.shuffle_buffer=0)")  # fmt: skip
    parser.add_argument("--profile", action="store_true",
                        help="also profile one more Ray epoch with py-spy")  # fmt: skip
    parser.add_argument("--plain-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/train_throughput.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("cmaclip").setLevel(logging.INFO)
    logger.setLevel(logging.INFO)

    overrides = [f"data.path={args.data}", f"stages.{STAGE}.epochs={args.epochs}",
                 "run.name=bench-train", *args.set]  # fmt: skip
    config = load_config(args.config, overrides)
    tasks = select_tasks(config, read_dataset_info(config.data_path()))
    init = resolve_path(args.init)
    threads = config.scaling.torch_threads or 1
    if args.plain_only:
        print(json.dumps(plain_epoch(config, tasks, init, threads)))
        return

    model, _ = load_model(init)
    spec = input_spec(model)
    del model
    load_before = os.getloadavg()
    results: dict = {"plain": []}
    results["preprocess"] = preprocess_rate(config, spec)
    logger.info("preprocess alone: %s", results["preprocess"])

    import ray

    ray.init(address="local", num_cpus=os.cpu_count(), log_to_driver=False)
    uri = tracking.tracking_uri(config.tracking.tracking_uri)
    parent = tracking.start_run(uri, EXPERIMENT, "train_throughput")
    # plain, Ray, plain, Ray: each Ray fit is compared with the plain runs on either side of
    # it, since this machine's speed drifts by a tenth within minutes
    for key, workers, worker_threads in (("ray1", 1, threads), ("ray2", 2, 1)):
        if "plain" not in args.skip and not (key == "ray2" and len(results["plain"]) > 1):
            logger.info("plain loop: one epoch of %s, %d torch threads", STAGE, threads)
            results["plain"].append(plain_in_subprocess(args))
            logger.info("plain: %s", results["plain"][-1])
        if key in args.skip:
            continue
        scaled = load_config(
            args.config,
            [*overrides, f"scaling.num_workers={workers}",
             f"scaling.torch_threads={worker_threads}",
             f"scaling.cpus_per_worker={config.scaling.cpus_per_worker / workers}"],
        )  # fmt: skip
        name = f"ray_{workers}_worker{'s' if workers > 1 else ''}"
        logger.info("%s: %d epochs of %s, %d torch threads each", name, args.epochs, STAGE,
                    worker_threads)  # fmt: skip
        results[name] = ray_fit(scaled, tasks, init, spec, name, uri, parent)
        logger.info("%s: %s", name, results[name])
        if "plain" not in args.skip and key == "ray1":
            results["plain"].append(plain_in_subprocess(args))
            logger.info("plain: %s", results["plain"][-1])
    tracking.end_run(uri, parent)
    if args.profile:
        logger.info("profile: one more epoch of %s with py-spy on the worker", STAGE)
        results["profile"] = profile_fit(
            load_config(args.config, [*overrides, f"stages.{STAGE}.epochs=1"]),
            tasks, init, spec,
        )  # fmt: skip
        logger.info("profile: %s", results["profile"])
    ray.shutdown()

    summary = _summary(results)
    info = read_dataset_info(config.data_path())
    shard_bytes = sum(path.stat().st_size for path in config.data_path().glob("*.parquet"))
    rows = sum(info["rows"].values())
    report = {
        "benchmark": "train_throughput",
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": machine_facts(load_before),
        "stage": {
            "name": STAGE,
            "init": str(init),
            "batch_size": config.stages[STAGE].batch_size,
            "cpus_per_worker": config.scaling.cpus_per_worker,
            "torch_threads": threads,
            "preprocess_in": config.data.preprocess_in,
        },
        **results,
        "summary": summary,
        # Ray Data streams: the object store holds a bounded window of blocks and a worker
        # holds its shuffle buffer and model, so neither peak grows with the number of rows;
        # what does is the shards on disk
        "per_million_rows": {
            "shards_gib": round(shard_bytes / rows * 1e6 / 2**30, 2),
            "worker_peak_rss_mib": summary.get("worker_peak_rss_mib"),
            "object_store_peak_mib": summary.get("object_store_peak_mib"),
        },
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
