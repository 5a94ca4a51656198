"""The staged training run, from config to an evaluated, exported model.

Read top to bottom: validate the config against the data set, open the run folder and the MLflow
parent run, build the initial weights once, then run each enabled stage as its own Ray Train
`TorchTrainer` fit, each starting from the previous stage's best checkpoint. Finally export the
last stage's best weights as `model/` (with its precision thresholds from the validation split),
evaluate the test split and write `report.json`, with its figures and `report.html` beside it.

A run name is a unit of work that survives its submissions. Submitting it again resumes it: a
stage whose best checkpoint sits in `checkpoints/<stage>/` with its `stage.json` marker is not
trained again, an unfinished stage continues from its latest checkpoint in Ray Train's storage,
and a run with `report.json` does nothing. A resubmission with a config that changes what is
trained (anything but where and how wide it runs: `scaling`, `tracking`, the data loading
resources, the failure policy, the error budget) is refused with the changed keys named;
`restart=True` (the CLI's `--restart`) deletes the run and trains it anew.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from cmaclip import tracking
from cmaclip.config import STAGES, Config, config_to_dict, flatten, resolve_path
from cmaclip.data.pipeline import TENSOR_COLUMNS, InputSpec, check_shards, ray_dataset
from cmaclip.data.shards import TooManySkippedError, read_dataset_info, shard_files
from cmaclip.evaluate import Evaluation, evaluate_model, precision_thresholds, write_report
from cmaclip.export import (
    META,
    WEIGHTS,
    input_spec,
    load_model,
    load_weights,
    save_model,
    staging_folder,
    write_text_atomic,
)
from cmaclip.model.cmaclip import CMACLIP, count_parameters

logger = logging.getLogger(__name__)

STAGE_MARKER = "stage.json"
RUN_STATE = "run.json"
# config keys a resubmission may change: where and how wide the run goes, not what it trains.
# The error budget is one of them: a run it stopped is resubmitted with a higher budget.
RESUMABLE_KEYS = (
    "scaling.",
    "tracking.",
    "data.preprocess_in",
    "data.preprocess_concurrency",
    "data.preprocess_cpus",
    "data.read_cpus",
    "data.max_skipped_fraction",
    "run.max_failures",
    "run.collective_timeout_s",
)


def select_tasks(config: Config, info: dict[str, Any]) -> dict[str, list[str]]:
    """The tasks to train, with their classes from dataset.json; unknown names are an error."""
    available = info["tasks"]
    wanted = config.data.tasks or list(available)
    unknown = [task for task in wanted if task not in available]
    if unknown:
        raise ValueError(
            f"data.tasks: {unknown} not in {config.data_path() / 'dataset.json'} "
            f"(it has {list(available)})"
        )
    weights = set(config.data.loss_weights) - set(wanted)
    if weights:
        raise ValueError(f"data.loss_weights: {sorted(weights)} are not trained tasks {wanted}")
    return {task: list(available[task]) for task in wanted}


def _ensure_ray(config: Config) -> None:
    """Join or start Ray, and refuse a scaling that would leave Ray Data no CPU to read with."""
    import ray

    if not ray.is_initialized():
        # joins the cluster of `ray job submit` or a running local head, else starts one
        ray.init(log_to_driver=True)
    resources = ray.cluster_resources()
    logger.info("Ray cluster resources: %s", resources)

    # Ray Data lists files in a task that asks for one whole CPU, next to the decoding actors
    scaling, data = config.scaling, config.data
    needed = scaling.num_workers * scaling.cpus_per_worker + 1.0
    actors = ""
    if data.preprocess_in == "actors":
        needed += data.preprocess_concurrency * data.preprocess_cpus
        actors = ", plus data.preprocess_concurrency x data.preprocess_cpus"
    if resources.get("CPU", 0) < needed:
        raise ValueError(
            f"the cluster has {resources.get('CPU', 0):g} CPUs, but training needs {needed:g}: "
            f"scaling.num_workers x scaling.cpus_per_worker{actors}, plus 1 for Ray Data's "
            f"file listing. Lower scaling.cpus_per_worker (e.g. --set "
            f"scaling.cpus_per_worker=0.5) or add CPUs."
        )


def _datasets(config: Config, spec: InputSpec) -> dict[str, Any]:
    """The train and val datasets the stages stream.

    Preprocessed rows, or the shard rows as read where each worker decodes its own batches
    (`data.preprocess_in: worker`).
    """
    import ray.data

    # the stage loop logs its own progress lines; Ray Data's bars would interleave with them
    ray.data.DataContext.get_current().enable_progress_bars = False
    data_dir = config.data_path()
    in_actors = config.data.preprocess_in == "actors"
    datasets = {}
    for split in ("train", "val"):
        dataset = ray_dataset(
            data_dir,
            split,
            spec,
            concurrency=config.data.preprocess_concurrency,
            preprocess_cpus=config.data.preprocess_cpus,
            read_cpus=config.data.read_cpus,
            shuffle_files=split == "train",
            max_skipped_fraction=config.data.max_skipped_fraction,
            preprocess=in_actors,
        )
        datasets[split] = dataset.select_columns(TENSOR_COLUMNS) if in_actors else dataset
    return datasets


def stage_trainer(
    config: Config,
    stage: str,
    *,
    tasks: dict[str, list[str]],
    datasets: dict[str, Any],
    init_weights: Path,
    train_rows: int,
    storage: Path,
    name: str,
    mlflow: dict[str, str] | None = None,
    cache_dir: Path | None = None,
    init_parts: tuple[str, ...] | None = None,
    callbacks: list[Any] | None = None,
):
    """The Ray Train `TorchTrainer` of one stage; a run fits it, a search trial too.

    With `cache_dir` the workers read a cache's rows instead of pixels and token ids, and
    `datasets` is not used. `init_parts` loads only those weights of `init_weights` (a trial
    whose fusion widths differ from the checkpoint's keeps its fresh fusion and heads).
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from cmaclip.training.loop import train_stage

    scaling = config.scaling
    return TorchTrainer(
        train_stage,
        train_loop_config={
            "config": config_to_dict(config),
            "stage": stage,
            "tasks": tasks,
            "init_weights": str(init_weights),
            "init_parts": list(init_parts) if init_parts else None,
            "train_rows": train_rows,
            "cache_dir": str(cache_dir) if cache_dir else None,
            "tracking_uri": (mlflow or {}).get("uri"),
            "mlflow_run_id": (mlflow or {}).get("run_id"),
        },
        torch_config=TorchConfig(
            backend="nccl" if scaling.use_gpu else "gloo", timeout_s=config.run.collective_timeout_s
        ),
        scaling_config=ScalingConfig(
            num_workers=scaling.num_workers,
            use_gpu=scaling.use_gpu,
            resources_per_worker={"CPU": scaling.cpus_per_worker},
        ),
        run_config=RunConfig(
            name=name,
            storage_path=str(storage),
            checkpoint_config=CheckpointConfig(
                num_to_keep=1, checkpoint_score_attribute="score", checkpoint_score_order="max"
            ),
            failure_config=FailureConfig(max_failures=config.run.max_failures),
            callbacks=callbacks,
        ),
        datasets=None if cache_dir else datasets,
    )


def _fit_stage(
    config: Config,
    stage: str,
    *,
    tasks: dict[str, list[str]],
    datasets: dict[str, Any],
    init_weights: Path,
    train_rows: int,
    mlflow: dict[str, str],
    cache_dir: Path | None = None,
) -> tuple[Any, dict[str, Any]]:
    """Run one stage through Ray Train; return its best checkpoint and that epoch's metrics.

    Ray Train's storage of the stage is kept between submissions: a stage fitted again finds
    its latest checkpoint there and resumes after it.
    """
    storage = config.storage_path()
    trainer = stage_trainer(
        config, stage, tasks=tasks, datasets=datasets, init_weights=init_weights,
        train_rows=train_rows, storage=storage, name=stage, mlflow=mlflow,
        cache_dir=cache_dir,
    )  # fmt: skip
    from ray.train import TrainingFailedError

    try:
        result = trainer.fit()
    except TrainingFailedError as error:
        budget = _budget_error(error)
        if budget is not None:  # the data, not the workers: a resubmission would fail the same
            raise TooManySkippedError(f"stage {stage}: {budget}") from None
        raise RuntimeError(
            f"stage {stage} failed after run.max_failures={config.run.max_failures} restarts; "
            f"submitting run {config.run.name} again resumes it from its latest checkpoint"
        ) from error
    if result.error:
        raise RuntimeError(f"stage {stage} failed") from result.error

    if not result.best_checkpoints:
        raise RuntimeError(f"stage {stage} reported no checkpoint (storage {storage / stage})")
    checkpoint, metrics = max(result.best_checkpoints, key=lambda item: item[1]["score"])
    return checkpoint, metrics


def _budget_error(error: BaseException) -> str | None:
    """The error budget's message behind a failed stage, wherever Ray wrapped it.

    A worker's own check arrives in `WorkerGroupError.worker_failures`. A decoding actor's
    reaches the worker through Ray Data's split coordinator, which passes the exception on
    only as the text of its traceback, so that text is searched too.
    """
    from ray.exceptions import RayError  # a task error poses as its cause's class too

    # every exception the failure holds: causes, contexts and each worker's own
    found: dict[int, BaseException] = {}
    pending = [error]
    while pending:
        current = pending.pop()
        if current is None or id(current) in found:
            continue
        found[id(current)] = current
        pending += [current.__cause__, current.__context__, getattr(current, "cause", None)]
        pending += list(getattr(current, "worker_failures", {}).values())

    for current in found.values():
        if isinstance(current, TooManySkippedError) and not isinstance(current, RayError):
            return str(current)
    marker = f"{TooManySkippedError.__module__}.{TooManySkippedError.__name__}: "
    for current in found.values():
        for line in str(current).splitlines():
            if marker in line:
                return line.split(marker, 1)[1].strip()
    return None


def _keep_best(checkpoint, stage_dir: Path, summary: dict[str, Any]) -> None:
    """Copy a stage's best weights to `checkpoints/<stage>/` with the marker that it finished.

    Written whole or not at all (a staging sibling renamed into place), so a folder with the
    marker always holds complete weights. The optimizer state stays in Ray Train's storage: the
    next stage starts its own.
    """
    with checkpoint.as_directory() as folder, staging_folder(stage_dir) as staging:
        for name in (WEIGHTS, META):
            shutil.copy2(Path(folder) / name, staging / name)
        (staging / STAGE_MARKER).write_text(json.dumps(summary, indent=2))


def finished_stage(run_dir: Path, stage: str) -> dict[str, Any] | None:
    """The summary of a stage that finished in an earlier submission, else None."""
    marker = run_dir / "checkpoints" / stage / STAGE_MARKER
    if not marker.is_file():
        return None
    return json.loads(marker.read_text())


def config_changes(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """`key: old -> new` for every config value that changes what a run trains."""
    old, new = flatten(before), flatten(after)
    return [
        f"{key}: {old.get(key, '<unset>')!r} -> {new.get(key, '<unset>')!r}"
        for key in sorted(old.keys() | new.keys())
        if old.get(key) != new.get(key) and not key.startswith(RESUMABLE_KEYS)
    ]


def _open_run_dir(config: Config, restart: bool) -> bool:
    """Prepare `runs/NAME/`; True when it resumes an earlier submission of the run.

    A fresh run (or a restart) starts from an empty run folder and empty stage storage, so that
    nothing of another run under the same name can be resumed by mistake.
    """
    run_dir, storage = config.run_dir(), config.storage_path()
    saved = run_dir / "config.yaml"
    if saved.is_file() and not restart:
        before = yaml.safe_load(saved.read_text()) or {}
        try:  # keys added to the code since then take their defaults on both sides
            before = config_to_dict(Config.model_validate(before))
        except ValueError:
            pass
        changes = config_changes(before, config_to_dict(config))
        if changes:
            raise ValueError(
                f"run {config.run.name} ({run_dir}) was submitted before with another config: "
                f"{'; '.join(changes)}. Resubmitting resumes a run as it was configured; give "
                f"a new run.name, or pass --restart to delete the run and train it anew"
            )
        return True

    if restart and run_dir.exists():
        logger.info("run %s: --restart deletes %s and trains it anew", config.run.name, run_dir)
    for name in ("checkpoints", "model", "cache", "report.json", RUN_STATE, "config.yaml"):
        path = run_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    for stage in STAGES:
        shutil.rmtree(storage / stage, ignore_errors=True)
    return False


def _mlflow_runs(
    config: Config, uri: str, state: dict[str, Any], parent_run_id: str | None = None
) -> str:
    """The MLflow run of this training run: the earlier submission's, reopened, or a new one.

    With `parent_run_id` a new run is nested under that run (an experiment's parent run).
    """
    previous = state.get("mlflow", {})
    if previous.get("uri") == uri and tracking.reopen_run(uri, previous.get("parent")):
        logger.info("MLflow: %s, run %s continued", uri, previous["parent"])
        return previous["parent"]
    parent = tracking.start_run(
        uri, config.tracking.experiment, config.run.name, parent_id=parent_run_id
    )
    tracking.log_params(uri, parent, flatten(config_to_dict(config)))
    tracking.log_artifacts(uri, parent, config.run_dir() / "config.yaml")
    state["mlflow"] = {"uri": uri, "parent": parent, "stages": {}}
    logger.info("MLflow: %s, run %s", uri, parent)
    return parent


def _stage_run(config: Config, stage: str, uri: str, parent: str, state: dict[str, Any]) -> str:
    """The stage's MLflow child run; an unfinished stage keeps the one it began in."""
    children = state["mlflow"].setdefault("stages", {})
    if tracking.reopen_run(uri, children.get(stage)):
        return children[stage]
    child = tracking.start_run(
        uri, config.tracking.experiment, f"{config.run.name}/{stage}", parent_id=parent,
        tags={"cmaclip.stage": stage},
    )  # fmt: skip
    tracking.log_params(uri, child, flatten(config.stages[stage].model_dump()))
    children[stage] = child
    return child


def stage_cache(
    config: Config, stage: str, *, weights: Path, tasks: dict[str, list[str]]
) -> Path | None:
    """The checked cache folder a stage reads, built first when its config says `build`."""
    from cmaclip.training.cache import STAGE_LEVEL, build_cache, check_cache

    setting = config.stages[stage].cache
    if setting is None:
        return None
    budget = config.data.max_skipped_fraction
    if setting == "build":
        cache_dir = config.run_dir() / "cache" / stage
        try:  # built by an earlier submission of this run, from the same weights and data
            check_cache(
                cache_dir, stage=stage, weights=weights, data_dir=config.data_path(), tasks=tasks,
                max_skipped_fraction=budget,
            )  # fmt: skip
            logger.info("stage %s reads the cache %s, built before", stage, cache_dir)
            return cache_dir
        except TooManySkippedError:
            raise  # the data is as broken as when the cache was built: rebuilding changes nothing
        except (FileNotFoundError, ValueError):
            pass
        build_cache(
            weights, config.data_path(), STAGE_LEVEL[stage], cache_dir,
            concurrency=config.data.preprocess_concurrency,
            cpus_per_actor=config.data.preprocess_cpus,
            threads=config.scaling.torch_threads or 1, max_skipped_fraction=budget,
        )  # fmt: skip
    else:
        cache_dir = resolve_path(setting)
    check_cache(
        cache_dir, stage=stage, weights=weights, data_dir=config.data_path(), tasks=tasks,
        max_skipped_fraction=budget,
    )  # fmt: skip
    logger.info("stage %s reads the cache %s", stage, cache_dir)
    return cache_dir


def train(
    config: Config, *, restart: bool = False, parent_run_id: str | None = None
) -> dict[str, Any]:
    """Run every enabled stage, export the model and evaluate it. Returns the report.

    Resumes an earlier submission of the same run name (see the module docstring); the report's
    `submission` says which stages this call trained and which it found finished. With
    `parent_run_id` the run's MLflow run is nested under it (an experiment's run).
    """
    started = time.perf_counter()
    data_dir = config.data_path()
    info = read_dataset_info(data_dir)
    tasks = select_tasks(config, info)
    train_rows = int(info["rows"]["train"])
    for split in ("train", "val", "test"):  # before any training, not after it
        check_shards(shard_files(data_dir, split), tasks)

    run_dir = config.run_dir()
    resumed = _open_run_dir(config, restart)
    if resumed and (run_dir / "report.json").is_file():
        report = json.loads((run_dir / "report.json").read_text())
        logger.info(
            "run %s finished already (report.json of %s): nothing to train; --restart trains "
            "it anew", config.run.name, report.get("finished", "unknown"),
        )  # fmt: skip
        report["submission"] = {"already_finished": True, "trained": [], "kept": []}
        return report
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(
        run_dir / "config.yaml", yaml.safe_dump(config_to_dict(config), sort_keys=False)
    )
    state = json.loads((run_dir / RUN_STATE).read_text()) if (run_dir / RUN_STATE).is_file() else {}
    logger.info("run %s%s: data %s, tasks %s, stages %s", run_dir,
                " (resumed)" if resumed else "", data_dir, list(tasks),
                config.enabled_stages())  # fmt: skip

    # the initial weights: pretrained encoders (or a fresh init), shared by every worker
    torch.manual_seed(config.run.seed)
    model = CMACLIP(config.model, tasks)
    weights = run_dir / "checkpoints" / "init"
    if not (weights / WEIGHTS).is_file():
        if config.run.init_encoders:
            load_weights(model, resolve_path(config.run.init_encoders), parts=("encoders.",))
            logger.info("encoders from %s", config.run.init_encoders)
        save_model(model, weights, {"stage": "init"})
    spec = input_spec(model)
    logger.info("model: %.2fM parameters", count_parameters(model) / 1e6)
    del model

    _ensure_ray(config)
    uri = tracking.tracking_uri(config.tracking.tracking_uri)
    parent = _mlflow_runs(config, uri, state, parent_run_id)
    write_text_atomic(run_dir / RUN_STATE, json.dumps(state, indent=2))

    datasets = _datasets(config, spec)
    stages: dict[str, Any] = {}
    submission: dict[str, Any] = {"already_finished": False, "trained": [], "kept": []}
    status = "FAILED"
    try:
        for stage in config.enabled_stages():
            stage_dir = run_dir / "checkpoints" / stage
            done = finished_stage(run_dir, stage)
            if done is not None:
                logger.info("stage %s finished in an earlier submission (best epoch %d, score "
                            "%.4f): not trained again", stage, done["best_epoch"],
                            done["score"])  # fmt: skip
                stages[stage], weights = done, stage_dir
                submission["kept"].append(stage)
                continue

            child = _stage_run(config, stage, uri, parent, state)
            write_text_atomic(run_dir / RUN_STATE, json.dumps(state, indent=2))
            stage_start = time.perf_counter()
            try:
                cache_dir = stage_cache(config, stage, weights=weights, tasks=tasks)
                checkpoint, metrics = _fit_stage(
                    config, stage, tasks=tasks, datasets=datasets, init_weights=weights,
                    train_rows=train_rows, mlflow={"uri": uri, "run_id": child},
                    cache_dir=cache_dir,
                )  # fmt: skip
                stages[stage] = {
                    "best_epoch": metrics["epoch"],
                    "score": metrics["score"],
                    "val_loss": metrics["val_loss"],
                    "seconds": round(time.perf_counter() - stage_start, 1),
                    "checkpoint": str(stage_dir),
                    **({"cache": str(cache_dir)} if cache_dir is not None else {}),
                }
                _keep_best(checkpoint, stage_dir, stages[stage])
            except BaseException:
                tracking.end_run(uri, child, "FAILED")
                raise
            tracking.end_run(uri, child)
            weights = stage_dir
            submission["trained"].append(stage)
            logger.info("stage %s done: best epoch %d, score %.4f", stage, metrics["epoch"],
                        metrics["score"])  # fmt: skip

        evaluation = _export_and_evaluate(config, weights, data_dir, stages, uri, parent)
        report = evaluation.report
        report["seconds"] = round(time.perf_counter() - started, 1)
        report["finished"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        report["submission"] = submission
        # report-figures/ and report.html, then report.json, whose presence marks the run done
        for path in write_report(evaluation, run_dir / "report.json"):
            tracking.log_artifacts(uri, parent, path, path.name if path.is_dir() else None)
        status = "FINISHED"
        return report
    finally:
        tracking.end_run(uri, parent, status)


def _export_and_evaluate(
    config: Config, weights: Path, data_dir: Path, stages: dict, uri: str, parent: str
) -> Evaluation:
    """Export `model/` with precision thresholds from the validation split; score the test split."""
    run_dir = config.run_dir()
    model, _ = load_model(weights)

    budget = config.data.max_skipped_fraction
    validation = evaluate_model(model, data_dir, split="val", max_skipped_fraction=budget)
    thresholds = precision_thresholds(validation, precision=0.9)
    save_model(
        model,
        run_dir / "model",
        {"run": config.run.name, "stages": stages, "thresholds": {"precision_0.9": thresholds}},
    )

    evaluation = evaluate_model(model, data_dir, split="test", max_skipped_fraction=budget)
    report = evaluation.report
    report["run"] = config.run.name
    report["stages"] = stages
    tracking.log_metrics(uri, parent, flatten_report(report), step=0)
    tracking.log_artifacts(uri, parent, run_dir / "model", "model")
    return evaluation


def flatten_report(report: dict[str, Any]) -> dict[str, float]:
    """`test/<task>/<metric>` for every numeric per-task metric in a report."""
    split = report["split"]
    return {
        f"{split}/{task}/{name}": value
        for task, metrics in report["tasks"].items()
        for name, value in metrics.items()
        if isinstance(value, int | float)
    }
