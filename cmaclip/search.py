"""Searching the fusion hyperparameters with Ray Tune, each trial a cached stage on Ray Train.

Read top to bottom: load the search config (a YAML file naming the training config to start
from, the stage, the checkpoint and cache, Tune's settings and the search space), check the
cache against the checkpoint and data once, then let Tune run the trials. A trial is a Ray
Train fit of the `warmup` stage on a `tokens` cache (or `tuning` on a `globals` cache) with the
trial's values set into the training config; its per-epoch `score` goes to Tune, whose ASHA
scheduler stops the trials that trail. At the end the trials are ranked by their best score and
the best configuration is written as a training config that `ray_jobs/train.py` takes as is.

Every trial is an MLflow run (its values as parameters, per-epoch metrics) under one parent run
for the search; Tune's own results folder holds the same per trial, with TensorBoard files.
"""

from __future__ import annotations

import copy
import itertools
import json
import logging
import re
import time
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cmaclip import tracking
from cmaclip.config import Config, config_to_dict, flatten, resolve_path
from cmaclip.data.shards import read_dataset_info

logger = logging.getLogger(__name__)

# the sampling functions a space entry may name, with Ray Tune's function for each
DISTRIBUTIONS = ("choice", "uniform", "loguniform", "int", "grid")
# what the `tuning` stage cannot search: its cache holds I and T, computed by this part
FUSION_KEYS = ("model.width", "model.layers", "model.heads", "model.dropout",
               "model.sequence_attention", "model.clip")  # fmt: skip


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TuneSettings(_Strict):
    algorithm: Literal["random", "optuna"] = Field(
        default="optuna", description="random sampling, or Optuna's TPE (model-based)"
    )
    num_samples: int = Field(default=8, ge=1, description="Trials (per grid point with grid).")
    max_concurrent: int = Field(default=2, ge=1)
    epochs: int = Field(default=4, ge=1, description="Epochs of a trial that is never stopped.")
    grace_period: int = Field(default=1, ge=1, description="ASHA: epochs before any stop.")
    reduction_factor: int = Field(default=2, ge=2, description="ASHA: keep 1/factor per rung.")
    seed: int = 0
    trial_cpus: float = Field(
        default=0.25, gt=0, description="CPUs held by a trial's driver, which mostly waits."
    )
    cpus_per_worker: float = Field(default=0.5, gt=0)
    torch_threads: int = Field(default=1, ge=1)


class SearchConfig(_Strict):
    name: str = "search"
    root: str = "runs"
    base: str = Field(description="The training config every trial starts from.")
    stage: Literal["warmup", "tuning"] = "warmup"
    init: str = Field(description="A run folder or checkpoint the stage starts from.")
    cache: str = Field(description="The stage's cache folder; built from `init` when missing.")
    tune: TuneSettings = TuneSettings()
    space: dict[str, dict[str, list[Any]]]

    def search_dir(self) -> Path:
        return resolve_path(self.root) / self.name


def load_search_config(path: str | Path, overrides: list[str] | None = None) -> SearchConfig:
    """Read and check a search config; errors name the file and the field."""
    from cmaclip.config import apply_overrides, read_yaml_mapping, validation_message

    path = Path(path)
    raw = apply_overrides(read_yaml_mapping(path, "search config"), overrides or [])
    try:
        search = SearchConfig.model_validate(raw)
    except ValidationError as error:
        raise ValueError(validation_message(path, error)) from None
    _check_space(search, path)
    return search


def base_config(search: SearchConfig) -> dict[str, Any]:
    """The training config the trials start from, as a plain dict."""
    from cmaclip.config import load_config

    return config_to_dict(load_config(resolve_path(search.base)))


def _set(raw: dict[str, Any], key: str, value: Any) -> None:
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value


def trial_config(search: SearchConfig, base: dict[str, Any], values: dict[str, Any]) -> Config:
    """The training config of one trial: the base, the trial's values, the search's scaling."""
    raw = copy.deepcopy(base)
    for key, value in values.items():
        _set(raw, key, value)
    settings = search.tune
    _set(raw, f"stages.{search.stage}.epochs", settings.epochs)
    _set(raw, f"stages.{search.stage}.cache", None)
    _set(raw, "scaling.num_workers", 1)
    _set(raw, "scaling.cpus_per_worker", settings.cpus_per_worker)
    _set(raw, "scaling.torch_threads", settings.torch_threads)
    return Config.model_validate(raw)


def _check_space(search: SearchConfig, where: Path) -> None:
    """Refuse entries that could not run: unknown kinds or keys, keys of another stage."""
    if not search.space:
        raise ValueError(f"{where}: space: name at least one hyperparameter to search")
    for key, entry in search.space.items():
        if len(entry) != 1 or next(iter(entry)) not in DISTRIBUTIONS:
            raise ValueError(
                f"{where}: space.{key}: give one of {list(DISTRIBUTIONS)}, e.g. "
                f"`{key}: {{choice: [1, 2]}}`"
            )
        kind, args = next(iter(entry.items()))
        if kind in ("uniform", "loguniform", "int") and (len(args) != 2 or args[0] >= args[1]):
            raise ValueError(f"{where}: space.{key}: {kind} takes [low, high] with low < high")
        if kind in ("choice", "grid") and not args:
            raise ValueError(f"{where}: space.{key}: {kind} needs at least one value")
        if kind == "grid" and search.tune.algorithm != "random":
            raise ValueError(f"{where}: space.{key}: grid works with tune.algorithm: random")
        if key.startswith("stages.") and not key.startswith(f"stages.{search.stage}."):
            raise ValueError(
                f"{where}: space.{key}: the search runs stage {search.stage} only, so a value "
                f"of another stage would change nothing"
            )
        if search.stage == "tuning" and key.startswith(FUSION_KEYS):
            raise ValueError(
                f"{where}: space.{key}: the tuning stage reads I and T from a globals cache, "
                f"which this part computed; search it in the warmup stage"
            )

    # every extreme of every entry must make a valid training config
    base = base_config(search)
    for key, entry in search.space.items():
        kind, args = next(iter(entry.items()))
        for value in (args[0], args[-1]):
            try:
                trial_config(search, base, {key: value})
            except ValidationError as error:
                raise ValueError(
                    f"{where}: space.{key}: value {value!r} gives an invalid training config: "
                    f"{error.errors()[0]['msg']}"
                ) from None

    # the sequence-wise attention splits its width over its heads
    def values(key: str) -> list[Any]:
        entry = search.space.get(key)
        if entry is None:
            node: Any = base
            for part in key.split("."):
                node = node[part]
            return [node]
        kind, args = next(iter(entry.items()))
        if kind not in ("choice", "grid"):
            raise ValueError(f"{where}: space.{key}: search widths and heads with choice")
        return list(args)

    if "model.width" in search.space or "model.heads" in search.space:
        for width, heads in itertools.product(values("model.width"), values("model.heads")):
            if width % heads:
                raise ValueError(
                    f"{where}: space: model.width {width} is not divisible by model.heads "
                    f"{heads}; pick widths that every heads value divides"
                )


def param_space(search: SearchConfig) -> dict[str, Any]:
    """Ray Tune's search space: one sampling function per dotted config key."""
    from ray import tune

    functions = {
        "choice": lambda args: tune.choice(args),
        "uniform": lambda args: tune.uniform(*args),
        "loguniform": lambda args: tune.loguniform(*args),
        "int": lambda args: tune.randint(args[0], args[1] + 1),  # high is inclusive here
        "grid": lambda args: tune.grid_search(args),
    }
    return {
        key: functions[kind](args)
        for key, entry in search.space.items()
        for kind, args in entry.items()
    }


def run_trial(values: dict[str, Any], setup: dict[str, Any]) -> None:
    """Tune function trainable: fit the cached stage with one trial's values on Ray Train."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from cmaclip.training.cache import FROZEN_PARTS, STAGE_LEVEL
    from cmaclip.training.run import stage_trainer

    search = SearchConfig.model_validate(setup["search"])
    config = trial_config(search, setup["base"], values)
    trial_id = ray.tune.get_context().get_trial_id()

    # Limitation: a trial loads only the frozen part of `init`; the trained part starts fresh,
    # also in a `tuning` search, where a run's tuning stage would continue the end_to_end heads
    # (the trials may change the heads' sizes, so those weights need not fit).
    trainer = stage_trainer(
        config,
        search.stage,
        tasks=setup["tasks"],
        datasets={},
        init_weights=Path(setup["init"]),
        train_rows=setup["train_rows"],
        storage=Path(setup["storage"]),
        name=trial_id,
        cache_dir=Path(setup["cache"]),
        init_parts=FROZEN_PARTS[STAGE_LEVEL[search.stage]],
        callbacks=[TuneReportCallback()],
    )
    trainer.fit()  # a failed fit raises, and Tune records the trial as errored


def _searcher(settings: TuneSettings):
    if settings.algorithm == "optuna":
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch

        searcher = OptunaSearch(seed=settings.seed)
        return ConcurrencyLimiter(searcher, max_concurrent=settings.max_concurrent)
    from ray.tune.search import BasicVariantGenerator

    return BasicVariantGenerator(random_state=settings.seed, max_concurrent=settings.max_concurrent)


def _scheduler(settings: TuneSettings):
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(
        time_attr="training_iteration",
        max_t=settings.epochs,
        grace_period=min(settings.grace_period, settings.epochs),
        reduction_factor=settings.reduction_factor,
    )


def _prepare(search: SearchConfig, base: dict[str, Any]) -> dict[str, Any]:
    """Check (or build) the cache against the checkpoint and data; the trials' shared setup."""
    from cmaclip.training.cache import STAGE_LEVEL, build_cache, check_cache, resolve_checkpoint
    from cmaclip.training.run import select_tasks

    config = Config.model_validate(base)
    data_dir = config.data_path()
    info = read_dataset_info(data_dir)
    tasks = select_tasks(config, info)
    level = STAGE_LEVEL[search.stage]
    init = resolve_checkpoint(resolve_path(search.init), level)
    cache_dir = resolve_path(search.cache)
    if not (cache_dir / "cache.json").is_file():
        logger.info("search %s: no cache at %s yet; building it from %s", search.name,
                    cache_dir, init)  # fmt: skip
        build_cache(init, data_dir, level, cache_dir, cpus_per_actor=1.0, threads=2,
                    max_skipped_fraction=config.data.max_skipped_fraction)  # fmt: skip
    check_cache(cache_dir, stage=search.stage, weights=init, data_dir=data_dir, tasks=tasks,
                max_skipped_fraction=config.data.max_skipped_fraction)  # fmt: skip
    return {
        "search": search.model_dump(mode="json"),
        "base": base,
        "tasks": tasks,
        "init": str(init),
        "cache": str(cache_dir),
        "train_rows": int(info["rows"]["train"]),
        "storage": str(search.search_dir() / "train"),
    }


def search(search_config: SearchConfig, *, resume: bool = False) -> dict[str, Any]:
    """Run (or resume) the search; returns the ranking and writes it with the best config."""
    import ray
    from ray import tune
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    started = time.perf_counter()
    search_dir = search_config.search_dir()
    tune_dir = search_dir / "tune"
    state_file = search_dir / "search.json"
    if resume and not tune.Tuner.can_restore(str(tune_dir)):
        raise FileNotFoundError(f"{tune_dir}: no search to resume; run it without --resume")
    if not resume and tune_dir.exists():
        raise ValueError(
            f"{tune_dir}: a search of this name exists; pass --resume to continue it, or give "
            f"another name (--set name=...)"
        )

    base = base_config(search_config)
    setup = _prepare(search_config, base)
    if not ray.is_initialized():
        ray.init(log_to_driver=True)

    uri = tracking.tracking_uri(base["tracking"]["tracking_uri"])
    experiment = base["tracking"]["experiment"]
    if resume and state_file.is_file():
        parent = json.loads(state_file.read_text())["mlflow_run_id"]
    else:
        search_dir.mkdir(parents=True, exist_ok=True)
        parent = tracking.start_run(uri, experiment, search_config.name,
                                    tags={"cmaclip.search": search_config.name})  # fmt: skip
        state_file.write_text(json.dumps({"mlflow_run_id": parent}, indent=2))
        (search_dir / "search.yaml").write_text(
            yaml.safe_dump(search_config.model_dump(mode="json"), sort_keys=False)
        )
        tracking.log_params(uri, parent, flatten(search_config.model_dump(mode="json")))
        tracking.log_artifacts(uri, parent, search_dir / "search.yaml")
    logger.info("search %s: %s, %d trials, MLflow run %s", search_config.name,
                search_config.tune.algorithm, search_config.tune.num_samples, parent)  # fmt: skip

    settings = search_config.tune
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, setup=setup), {"CPU": settings.trial_cpus}
    )
    status = "FAILED"
    try:
        if resume:
            tuner = tune.Tuner.restore(str(tune_dir), trainable=trainable, resume_errored=False)
        else:
            tracking.experiment_id(uri, experiment)  # created with its artifact location
            tuner = tune.Tuner(
                trainable,
                param_space=param_space(search_config),
                tune_config=tune.TuneConfig(
                    metric="score",
                    mode="max",
                    num_samples=settings.num_samples,
                    search_alg=_searcher(settings),
                    scheduler=_scheduler(settings),
                ),
                run_config=tune.RunConfig(
                    name="tune",
                    storage_path=str(search_dir),
                    callbacks=[
                        MLflowLoggerCallback(
                            tracking_uri=uri,
                            experiment_name=experiment,
                            tags={
                                "mlflow.parentRunId": parent,
                                "cmaclip.search": search_config.name,
                            },
                        )  # fmt: skip
                    ],
                ),
            )
        results = tuner.fit()

        ranking = rank_trials(results, settings.epochs)
        report = write_outputs(search_config, base, ranking, search_dir)
        report["seconds"] = round(time.perf_counter() - started, 1)
        (search_dir / "ranking.json").write_text(json.dumps(report, indent=2))
        if ranking and ranking[0]["score"] is not None:
            tracking.log_metrics(uri, parent, {"best_score": ranking[0]["score"]}, step=0)
        tracking.log_metrics(uri, parent, {"seconds": report["seconds"]}, step=0)
        for name in ("ranking.json", "best.yaml"):
            if (search_dir / name).is_file():
                tracking.log_artifacts(uri, parent, search_dir / name)
        status = "FINISHED"
        return report
    finally:
        tracking.end_run(uri, parent, status)


def rank_trials(results, max_epochs: int) -> list[dict[str, Any]]:
    """One row per trial, best first; errored trials last, with the first line of their error."""
    rows = []
    for result in results:
        history = result.metrics_dataframe
        scores = history["score"].dropna() if history is not None and "score" in history else []
        epochs = len(scores)
        if result.error is not None:
            status = "errored"
        elif epochs < max_epochs:
            status = "stopped early"
        else:
            status = "finished"
        error = str(result.error).strip().splitlines() if result.error is not None else []
        rows.append(
            {
                "trial": _trial_id(result.path),
                "status": status,
                "score": float(max(scores)) if epochs else None,
                "epochs": epochs,
                "values": dict(result.config or _trial_params(result.path)),
                "error": _error_line(error) if error else None,
                "path": result.path,
            }
        )
    rows.sort(key=lambda row: (row["score"] is None, -(row["score"] or 0.0)))
    return rows


def _trial_id(path: str | None) -> str:
    """Tune's trial id from its folder name, `run_trial_<id>_<n>_<values>_<date>`.

    Random search ids look like `e16cb_00000`, Optuna's like `412f8f7e`.
    """
    match = re.match(r".*?_([0-9a-f]{5,}(?:_\d{5})?)_\d+_", Path(path or "").name)
    return match.group(1) if match else Path(path or "?").name


def _trial_params(path: str | None) -> dict[str, Any]:
    """A trial's values from its folder (a restored search's errored trials carry none)."""
    params = Path(path or "") / "params.json"
    return json.loads(params.read_text()) if params.is_file() else {}


def _error_line(lines: list[str]) -> str:
    """The most telling line of a trial's error: the exception message, not the wrapper's."""
    for line in reversed(lines):
        if "Error" in line and ":" in line:
            return line.strip()[:300]
    return lines[-1].strip()[:300]


def write_outputs(
    search_config: SearchConfig,
    base: dict[str, Any],
    ranking: list[dict[str, Any]],
    search_dir: Path,
) -> dict[str, Any]:
    """Write `best.yaml` (a full training config) and return the search's report."""
    report: dict[str, Any] = {"search": search_config.name, "trials": ranking, "best": None}
    best = next((row for row in ranking if row["score"] is not None), None)
    if best is None:
        logger.warning("search %s: no trial reported a score", search_config.name)
        return report

    # the trial's values on the base config; epochs, scaling and the rest stay the base's
    raw = copy.deepcopy(base)
    for key, value in best["values"].items():
        _set(raw, key, value)
    _set(raw, "run.name", f"{search_config.name}-best")
    config = Config.model_validate(raw)
    header = (
        f"# The best configuration of search {search_config.name}: trial {best['trial']}, "
        f"{search_config.stage} score {best['score']:.4f}.\n"
        f"#\n#   python ray_jobs/train.py --config {search_dir / 'best.yaml'}\n\n"
    )
    body = yaml.safe_dump(config_to_dict(config), sort_keys=False)
    (search_dir / "best.yaml").write_text(header + body)
    report["best"] = {"trial": best["trial"], "score": best["score"], "values": best["values"],
                      "config": str(search_dir / "best.yaml")}  # fmt: skip
    return report


def format_ranking(report: dict[str, Any]) -> str:
    """The ranked trials as a table for the terminal."""
    keys = sorted({key for row in report["trials"] for key in row["values"]})
    lines = [f"{'rank':<5}{'trial':<10}{'status':<15}{'score':>8}{'epochs':>8}  values"]
    for rank, row in enumerate(report["trials"], 1):
        score = f"{row['score']:.4f}" if row["score"] is not None else "-"
        values = ", ".join(f"{key}={_short(row['values'].get(key))}" for key in keys)
        lines.append(f"{rank:<5}{row['trial']:<10}{row['status']:<15}{score:>8}"
                     f"{row['epochs']:>8}  {values}")  # fmt: skip
        if row["error"]:
            lines.append(f"{'':<5}{'':<10}error: {row['error']}")
    return "\n".join(lines)


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)
