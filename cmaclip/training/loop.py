"""The per-worker training loop of one stage, run by every Ray Train worker.

Read top to bottom: set up threads, seed and model; freeze what the stage does not train; wrap
for DDP; build the optimizer over the trained parameters only; resume from the stage's latest
checkpoint when Ray Train hands one over; then per epoch train on this worker's shard of the
training data, validate on its shard of the validation data, combine the validation counts over
all workers, and report metrics plus a checkpoint to Ray Train, which keeps the best one by
`score` (for the next stage) and the latest one (for a resume).

A checkpoint holds what a resume needs: the weights (`model.safetensors`, `model.json`) and
`training_state.pt` with the optimizer's and the learning-rate schedule's state and the number of
epochs done, read back with `torch.load(weights_only=True)`. Ray Train gives the latest
checkpoint to the workers it restarts after a failure, and to a stage fitted again on the same
storage (a resubmitted run), through `ray.train.get_checkpoint()`.
"""

from __future__ import annotations

import logging
import math
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from open_clip.loss import ClipLoss
from ray.data.collate_fn import ArrowBatchCollateFn

from cmaclip.config import Config
from cmaclip.data.pipeline import TENSOR_COLUMNS, Preprocessor
from cmaclip.data.shards import check_skipped_budget
from cmaclip.export import input_spec, load_weights, write_model_files
from cmaclip.metrics import macro_accuracy_from_confusion
from cmaclip.model.cmaclip import CMACLIP
from cmaclip.tracking import log_metrics, peak_rss_mib
from cmaclip.training.cache import CACHE_COLUMNS, CachedSplit, cached_inputs, read_manifest
from cmaclip.training.losses import multitask_loss

logger = logging.getLogger(__name__)

TRAINING_STATE = "training_state.pt"


def _setup_logging(rank: int) -> None:
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("cmaclip").setLevel(level)


def _unwrap(model: torch.nn.Module) -> CMACLIP:
    return model.module if hasattr(model, "module") else model


def _lr_lambda(warmup_steps: int, total_steps: int):
    """Linear warm-up, then cosine decay to zero over the stage."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def make_optimizer(params: list[torch.nn.Parameter], stage_config) -> torch.optim.AdamW:
    """AdamW over the trained parameters, fused into one kernel per step where torch has one.

    The default on a CPU updates each trained tensor (155 in the emoji model's end_to_end stage)
    with its own handful of ops: 16% of that stage's step, against 4% fused. The fused update
    computes the same rule.
    """
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return torch.optim.AdamW(
        params, lr=stage_config.lr, weight_decay=stage_config.weight_decay, fused=fused
    )


def _all_reduce(tensors: list[torch.Tensor], op=dist.ReduceOp.SUM) -> None:
    if dist.is_available() and dist.is_initialized():
        for tensor in tensors:
            dist.all_reduce(tensor, op=op)


def agreed_batches(batches, limit: int | None = None):
    """Yield batches while every worker still has one, so that all take the same steps.

    Before each step the workers agree (a one-number all-reduce) whether all of them hold a
    batch; the first worker to run out ends the epoch for everyone. Without this, a worker whose
    shard holds fewer rows would leave its peers waiting in the next gradient all-reduce until
    the collective timeout. Rows left in a longer shard are read and dropped (counted as held
    back), so the data pipeline still finishes its epoch. `limit` caps the steps.
    """
    iterator = iter(batches)
    step = 0
    while limit is None or step < limit:
        batch = next(iterator, None)
        present = torch.tensor([0 if batch is None else 1], dtype=torch.int64)
        _all_reduce([present], op=dist.ReduceOp.MIN)
        if not int(present):
            if batch is not None:
                logger.debug("a peer's shard ran out after %d steps; dropping the rest", step)
            break
        yield batch
        step += 1
    for _ in iterator:
        pass


def _save_checkpoint(folder: str, model: CMACLIP, optimizer, schedule, *, stage, epoch, world):
    """A checkpoint folder with the weights and the state that resuming after `epoch` needs."""
    write_model_files(model, Path(folder), {"stage": stage, "epoch": epoch})
    state = {
        "stage": stage,
        "epoch": epoch,
        "world": world,
        "optimizer": optimizer.state_dict(),
        "schedule": schedule.state_dict(),
    }
    torch.save(state, Path(folder) / TRAINING_STATE)


def _load_training_state(folder: Path, stage: str) -> dict[str, Any]:
    """The optimizer and schedule state of a checkpoint; nothing but tensors and numbers."""
    path = folder / TRAINING_STATE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; this checkpoint cannot resume a stage")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # an unpickler error: a file that holds more than state
        raise ValueError(f"{path}: not a training state this code reads ({error})") from None
    if state.get("stage") != stage:
        raise ValueError(f"{path}: a checkpoint of stage {state.get('stage')!r}, not {stage!r}")
    return state


class _Progress:
    """Progress lines for the job log: stage, epoch, step, loss, throughput and ETA."""

    def __init__(self, stage: str, epochs: int, steps: int, enabled: bool, first: int = 0):
        self.stage, self.epochs, self.steps, self.enabled = stage, epochs, steps, enabled
        self.first = first  # epochs done before a resume: not part of this process's rate
        self.every = max(1, steps // 5)
        self.start = time.perf_counter()
        self.samples = 0

    def step(self, epoch: int, step: int, batch: int, loss: float) -> None:
        self.samples += batch
        if not self.enabled or (step + 1) % self.every and step + 1 != self.steps:
            return
        elapsed = time.perf_counter() - self.start
        done = (epoch - self.first) * self.steps + step + 1
        left = (self.epochs - self.first) * self.steps - done
        eta = elapsed / done * left
        logger.info(
            "stage %s epoch %d/%d step %d/%d loss %.4f %.1f samples/s ETA %dm%02ds",
            self.stage, epoch + 1, self.epochs, step + 1, self.steps, loss,
            self.samples / elapsed, eta // 60, eta % 60,
        )  # fmt: skip


def _move(
    batch: dict[str, torch.Tensor], device: torch.device, channels_last: bool = False
) -> dict[str, torch.Tensor]:
    moved = {key: value.to(device, non_blocking=True) for key, value in batch.items()}
    images = moved.get("images")
    if channels_last and images is not None and images.dim() == 4:  # [B, C, H, W] pixels
        moved["images"] = images.contiguous(memory_format=torch.channels_last)
    return moved


def apply_speed_switches(model: CMACLIP, scaling) -> CMACLIP:
    """The model in channels-last memory order and compiled, where `scaling` asks for them.

    Before DDP wraps it. `compile()` works in place, so the state dict keeps its names and
    checkpoints load into an uncompiled model.
    """
    if scaling.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if scaling.compile:
        model.compile()
    return model


def _autocast(device: torch.device, precision: str):
    """The forward pass and loss in bfloat16 where `scaling.precision` asks for it.

    Autocast keeps the weights float32 and runs each op in the type that suits it (matrix
    products in bf16, reductions and the softmax in float32), so no loss scaling is needed.
    """
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def _classify(model, batch: dict[str, torch.Tensor], rows: torch.Tensor, cached: bool):
    """The classifier's output on `rows` of a batch: from pixels and token ids, or from a cache."""
    if cached:
        return model(cached=cached_inputs(batch, rows))
    return model(batch["images"][rows], batch["text"][rows])


class PreprocessCollate(ArrowBatchCollateFn):
    """Preprocesses a batch of shard rows where the worker collates it (`preprocess_in: worker`).

    Ray Data starts a new pool of decoding actors for every pass over a dataset, and each pays
    for importing torch and open_clip before its first batch; on a small machine that costs
    more than the decoding itself. Here the `Preprocessor` lives for the whole stage in the
    training worker and runs in `iter_torch_batches`' prefetch threads, so the next batch is
    decoded while the model trains on this one. It counts rows and applies the error budget
    like an actor would.
    """

    def __init__(self, spec, *, max_skipped_fraction: float, where: str):
        super().__init__()
        self.preprocess = Preprocessor(spec, max_skipped_fraction=max_skipped_fraction, where=where)
        self._lock = threading.Lock()  # prefetch threads share the counts and the tokenizer

    def __call__(self, batch) -> dict[str, torch.Tensor]:
        with self._lock:
            out = self.preprocess(batch)
        return {name: torch.from_numpy(out[name]) for name in TENSOR_COLUMNS}


class _StartedEpoch:
    """The training batches of one epoch, asked for ahead of time in a thread.

    Every pass over a Ray Dataset starts its pipeline anew (listing the files, reading their
    footers, the first blocks): seconds in which the worker would sit idle. Where the workers
    decode their own batches, the loop starts the next epoch's pass while it validates, so that
    its first batch is waiting when training resumes. An error in the thread is raised where
    the batches are read.
    """

    def __init__(self, make_batches):
        self._iterator = None
        self._first = _END
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._start, args=(make_batches,), daemon=True)
        self._thread.start()

    def _start(self, make_batches) -> None:
        try:
            self._iterator = iter(make_batches())
            self._first = next(self._iterator, _END)
        except BaseException as error:  # raised again in the loop's thread
            self._error = error

    def __iter__(self):
        self._thread.join()
        if self._error is not None:
            raise self._error
        if self._first is _END:
            return
        yield self._first
        yield from self._iterator


class _Stopwatch:
    """Sums the time a loop spends waiting on an iterator for its next item."""

    def __init__(self):
        self.seconds = 0.0
        self.first = 0.0  # the wait for the first item: the pipeline's start-up

    def around(self, items):
        iterator = iter(items)
        while True:
            started = time.perf_counter()
            item = next(iterator, _END)
            waited = time.perf_counter() - started
            self.first = self.first or waited
            self.seconds += waited
            if item is _END:
                return
            yield item


_END = object()


def train_step(
    model,
    batch,
    *,
    stage,
    optimizer,
    schedule,
    clip_loss,
    cache_level,
    loss_weights,
    device,
    where,
    precision: str = "fp32",
    channels_last: bool = False,
) -> tuple[float, int, int]:
    """One optimizer step on a batch; returns its loss and the rows it used and skipped.

    The plain-loop side of the training benchmark calls this too, so that both sides of its
    ratio run the same step.
    """
    columns = CACHE_COLUMNS[cache_level] if cache_level else TENSOR_COLUMNS
    batch = _move({k: batch[k] for k in columns}, device, channels_last)
    valid = batch["valid"].bool()

    # a batch with no usable row still runs forward and backward (with a zero loss):
    # every DDP worker must take part in every gradient all-reduce
    keep = valid if valid.any() else torch.ones_like(valid)
    scale = 1.0 if valid.any() else 0.0
    labels = batch["labels"][keep]

    with _autocast(device, precision):
        if stage == "contrastive":
            images, text = batch["images"][keep], batch["text"][keep]
            loss = clip_loss(*model(images, text, contrastive=True)) * scale
        else:
            out = _classify(model, batch, keep, cached=cache_level is not None)
            loss, _ = multitask_loss(out.logits, labels, loss_weights)
            loss = loss * scale
    if not torch.isfinite(loss):
        raise FloatingPointError(
            f"stage {stage}: the training loss is {float(loss)} at {where}; lower "
            f"stages.{stage}.lr (now {optimizer.defaults['lr']:g})"
        )

    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    schedule.step()
    used = int(valid.sum())
    return float(loss.detach()), used, len(valid) - used


def _validate(
    model, batches, *, stage, tasks, device, clip_loss, cache_level, precision, channels_last
) -> dict[str, Any]:
    """Validation counts on this worker's shard, summed over all workers."""
    model.eval()
    net = _unwrap(model)
    task_names = list(tasks)
    confusion = [torch.zeros(len(tasks[t]), len(tasks[t]), dtype=torch.int64) for t in task_names]
    sums = torch.zeros(4, dtype=torch.float64)  # loss sum, batches, rows used, rows skipped
    weight_sum = torch.zeros(len(task_names), dtype=torch.float64)
    columns = CACHE_COLUMNS[cache_level] if cache_level else TENSOR_COLUMNS

    with torch.no_grad():
        for batch in batches:
            batch = _move({k: batch[k] for k in columns}, device, channels_last)
            valid = batch["valid"].bool()
            sums[3] += float((~valid).sum())
            if not valid.any():
                continue
            labels = batch["labels"][valid]

            with _autocast(device, precision):
                if stage == "contrastive":
                    images, text = batch["images"][valid], batch["text"][valid]
                    loss = clip_loss(*net(images, text, contrastive=True))
                else:
                    out = _classify(net, batch, valid, cached=cache_level is not None)
                    loss, _ = multitask_loss(out.logits, labels)
            if stage != "contrastive":
                weight_sum += out.image_weight.sum(dim=0).double().cpu()
                for k, task in enumerate(task_names):
                    labelled = labels[:, k] >= 0
                    pred = out.logits[task][labelled].argmax(dim=1).cpu()
                    truth = labels[:, k][labelled].cpu()
                    size = len(tasks[task])
                    confusion[k] += torch.bincount(truth * size + pred, minlength=size * size).view(
                        size, size
                    )
            sums[0] += float(loss)
            sums[1] += 1
            sums[2] += int(valid.sum())

    _all_reduce([sums, weight_sum, *confusion])
    metrics: dict[str, Any] = {
        "val_loss": float(sums[0] / max(1.0, float(sums[1]))),
        "val_rows_used": int(sums[2]),
        "val_rows_skipped": int(sums[3]),
    }
    if stage != "contrastive":
        rows = max(1.0, float(sums[2]))
        per_task = []
        for k, task in enumerate(task_names):
            matrix = confusion[k].numpy()
            per_task.append(macro_accuracy_from_confusion(matrix))
            metrics[f"val_macro_accuracy/{task}"] = per_task[-1]
            metrics[f"val_accuracy/{task}"] = float(np.trace(matrix) / max(1, matrix.sum()))
            metrics[f"val_image_weight/{task}"] = float(weight_sum[k] / rows)
        metrics["val_macro_accuracy"] = float(np.mean(per_task))
    return metrics


def _check_budget(config, epoch, split, used, skipped, collate) -> None:
    """The error budget over an epoch's rows of all workers, whatever the split's size.

    The decoders apply it as they go once they have read 256 rows; a smaller split, or one
    that no row of survives, is caught here, on every worker alike since the counts are
    summed. Where this worker decoded its rows, its first reasons go with the message.
    """
    check_skipped_budget(
        used + skipped, skipped, config.data.max_skipped_fraction,
        where=f"{config.data_path()} {split}, epoch {epoch + 1}",
        option="data.max_skipped_fraction",
        reasons=collate.preprocess.reasons if collate else (),
    )  # fmt: skip


def train_stage(loop_config: dict[str, Any]) -> None:
    """Ray Train worker function for one stage (`loop_config` is built by `run.py`)."""
    config = Config.model_validate(loop_config["config"])
    stage: str = loop_config["stage"]
    tasks: dict[str, list[str]] = loop_config["tasks"]
    stage_config = config.stages[stage]
    # with a cache, rows hold the frozen part's outputs instead of pixels and token ids
    cache_dir: str | None = loop_config.get("cache_dir")
    cache_level = read_manifest(cache_dir)["level"] if cache_dir else None

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    _setup_logging(rank)

    scaling = config.scaling
    threads = scaling.torch_threads or max(1, math.ceil(scaling.cpus_per_worker))
    torch.set_num_threads(threads)
    torch.manual_seed(config.run.seed + rank)

    # model: build, start from the previous stage's best weights, freeze for this stage
    model = CMACLIP(config.model, tasks)
    if loop_config.get("init_weights"):
        parts = loop_config.get("init_parts")
        load_weights(model, loop_config["init_weights"], parts=tuple(parts) if parts else None)
    params = model.set_stage(stage)
    logger.info(
        "stage %s: %d workers, %d threads each, training %.2fM of %.2fM parameters%s",
        stage, world, threads,
        sum(p.numel() for p in params) / 1e6, sum(p.numel() for p in model.parameters()) / 1e6,
        f", from a {cache_level} cache" if cache_level else "",
    )  # fmt: skip
    model = ray.train.torch.prepare_model(apply_speed_switches(model, scaling))
    device = ray.train.torch.get_device()

    # optimizer and schedule over the trained parameters only
    optimizer = make_optimizer(params, stage_config)
    batch_size = max(1, stage_config.batch_size // world)
    steps = max(1, loop_config["train_rows"] // world // batch_size)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _lr_lambda(stage_config.warmup_steps, steps * stage_config.epochs)
    )

    # resume: Ray Train hands over the latest checkpoint after a restart or a resubmission.
    # Limitation: the random generators' states are not in the checkpoint, so a resumed stage
    # draws other dropout masks than an uninterrupted one would; weights, optimizer and
    # schedule continue exactly, but the two runs are not bit-identical.
    first_epoch = 0
    resumed = ray.train.get_checkpoint()
    if resumed is not None:
        with resumed.as_directory() as folder:
            load_weights(_unwrap(model), folder)
            state = _load_training_state(Path(folder), stage)
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        first_epoch = int(state["epoch"])
        logger.info(
            "stage %s resumes after epoch %d of %d from %s (schedule at step %d)",
            stage, first_epoch, stage_config.epochs, resumed.path, schedule.last_epoch,
        )  # fmt: skip

    # Limitation: the contrastive loss takes its negatives from the worker's own batch; gathering
    # features over workers would need equal batch sizes, which skipped rows do not guarantee.
    clip_loss = ClipLoss()

    collate: dict[str, PreprocessCollate | None] = {}
    if cache_dir:
        train_cache = CachedSplit(cache_dir, "train", rank=rank, world=world)
        val_cache = CachedSplit(cache_dir, "val", rank=rank, world=world, equal=False)
    else:
        train_shard = ray.train.get_dataset_shard("train")
        val_shard = ray.train.get_dataset_shard("val")
        collate = {"train": None, "val": None}  # None: the rows come preprocessed
        if config.data.preprocess_in == "worker":
            spec = input_spec(_unwrap(model))
            collate = {
                split: PreprocessCollate(
                    spec,
                    max_skipped_fraction=config.data.max_skipped_fraction,
                    where=f"{config.data_path()} {split}",
                )  # fmt: skip
                for split in collate
            }
    progress = _Progress(stage, stage_config.epochs, steps, enabled=rank == 0, first=first_epoch)
    loss_weights = config.data.loss_weights

    def shard_batches(epoch: int):
        return train_shard.iter_torch_batches(
            batch_size=batch_size,
            dtypes=None,
            collate_fn=collate["train"],
            pin_memory=scaling.pin_memory,
            prefetch_batches=2,
            drop_last=True,  # every worker gets the same rows, so the same number of steps
            local_shuffle_buffer_size=config.data.shuffle_buffer or None,
            local_shuffle_seed=config.run.seed + 1000 * epoch + rank,
        )

    # where workers decode their own batches, the next epoch's pass starts during validation;
    # decoding actors would need a second actor pool for it, beside validation's, and Ray Data
    # would wait for CPUs a small cluster does not have
    overlap = not cache_dir and config.data.preprocess_in == "worker"
    started = None

    for epoch in range(first_epoch, stage_config.epochs):
        model.train()
        epoch_start = time.perf_counter()
        loss_sum, batches, used, skipped = 0.0, 0, 0, 0

        if cache_dir:
            shuffle_seed = config.run.seed + 1000 * epoch + rank
            batches_of_epoch = train_cache.batches(
                batch_size, shuffle_seed=shuffle_seed, drop_last=True
            )
            val_batches = val_cache.batches(batch_size)
        else:
            batches_of_epoch = started or shard_batches(epoch)
            started = None
            val_batches = val_shard.iter_torch_batches(
                batch_size=batch_size,
                dtypes=None,
                collate_fn=collate["val"],
                pin_memory=scaling.pin_memory,
            )
        waiting = _Stopwatch()
        for step, batch in enumerate(agreed_batches(waiting.around(batches_of_epoch))):
            loss, rows_used, rows_skipped = train_step(
                model, batch, stage=stage, optimizer=optimizer, schedule=schedule,
                clip_loss=clip_loss, cache_level=cache_level, loss_weights=loss_weights,
                device=device, where=f"epoch {epoch + 1} step {step + 1}",
                precision=scaling.precision, channels_last=scaling.channels_last,
            )  # fmt: skip
            used += rows_used
            skipped += rows_skipped
            loss_sum += loss
            batches += 1
            progress.step(epoch, min(step, steps - 1), rows_used, loss)
        train_seconds = time.perf_counter() - epoch_start
        if overlap and epoch + 1 < stage_config.epochs:
            started = _StartedEpoch(lambda epoch=epoch: shard_batches(epoch + 1))

        # rows over all workers; the equal split's remainder and each worker's last partial
        # batch are held back this epoch (which rows, the shuffle decides anew every epoch)
        counts = torch.tensor([used, skipped], dtype=torch.float64)
        _all_reduce([counts])
        used, skipped = int(counts[0]), int(counts[1])
        _check_budget(config, epoch, "train", used, skipped, collate.get("train"))
        fewest, most = torch.tensor([batches]), torch.tensor([batches])
        _all_reduce([fewest], op=dist.ReduceOp.MIN)
        _all_reduce([most], op=dist.ReduceOp.MAX)

        validation = _validate(
            model, val_batches, stage=stage, tasks=tasks, device=device, clip_loss=clip_loss,
            cache_level=cache_level, precision=scaling.precision,
            channels_last=scaling.channels_last,
        )  # fmt: skip
        _check_budget(
            config, epoch, "val", validation["val_rows_used"], validation["val_rows_skipped"],
            collate.get("val"),
        )  # fmt: skip
        if config.selection_metric == "val_loss" or stage == "contrastive":
            score = -validation["val_loss"]
        else:
            score = validation["val_macro_accuracy"]

        metrics = {
            "stage": stage,
            "epoch": epoch + 1,
            "resumed_after_epoch": first_epoch,
            "train_loss": loss_sum / max(1, batches),
            "train_steps_min": int(fewest),
            "train_steps_max": int(most),
            "workers": world,
            "train_rows_used": used,
            "train_rows_skipped": skipped,
            "train_rows_held_back": loop_config["train_rows"] - used - skipped,
            "epoch_seconds": time.perf_counter() - epoch_start,
            # the training part alone, the share of it spent waiting for the next batch, and
            # this worker's peak resident memory so far: what the throughput benchmarks read
            "train_seconds": train_seconds,
            "train_samples_per_s": (used + skipped) / max(train_seconds, 1e-9),
            "data_wait_seconds": waiting.seconds,
            "data_wait_fraction": waiting.seconds / max(train_seconds, 1e-9),
            "data_first_batch_seconds": waiting.first,
            "worker_peak_rss_mib": peak_rss_mib(),
            "lr": schedule.get_last_lr()[0],
            **validation,
            "score": score,
        }
        if rank == 0:
            logger.info(
                "stage %s epoch %d: train_loss %.4f val_loss %.4f score %.4f (%.0fs)",
                stage, epoch + 1, metrics["train_loss"], metrics["val_loss"], score,
                metrics["epoch_seconds"],
            )  # fmt: skip
            if loop_config.get("mlflow_run_id"):
                log_metrics(
                    loop_config["tracking_uri"], loop_config["mlflow_run_id"], metrics, epoch + 1
                )

        # Ray Train uploads the folder and records it only once the upload is complete, so a
        # worker killed mid-upload leaves the previous checkpoint as the latest
        with tempfile.TemporaryDirectory() as folder:
            checkpoint = None
            if rank == 0:
                _save_checkpoint(
                    folder, _unwrap(model), optimizer, schedule, stage=stage, epoch=epoch + 1,
                    world=world,
                )  # fmt: skip
                checkpoint = ray.train.Checkpoint.from_directory(folder)
            ray.train.report(metrics, checkpoint=checkpoint)
