"""Typed run configuration: one YAML file, validated into pydantic models.

The same `Config` drives a local run, a `ray job submit` run and a cluster run; only paths and
the scaling section change. Relative paths are resolved against the project home (the
`CMACLIP_HOME` environment variable, else the current folder) so that a job whose code was
uploaded by `ray job submit --working-dir .` still writes its runs and reads its data where the
user launched it, not inside Ray's temporary copy of the code.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from cmaclip.data.shards import DEFAULT_MAX_SKIPPED_FRACTION

STAGES = ("contrastive", "warmup", "end_to_end", "tuning")
HOME_ENV = "CMACLIP_HOME"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ClipConfig(_Strict):
    """Which open_clip encoders to start from."""

    name: str = "cmaclip-tiny"
    pretrained: str | None = Field(
        default=None,
        description="An open_clip pretrained tag, or the path of a local checkpoint file.",
    )
    image_size: int | None = None
    context_length: int | None = None


class HeadConfig(_Strict):
    hidden: int = 256
    depth: int = 1
    dropout: float = 0.1


class ModelConfig(_Strict):
    clip: ClipConfig = ClipConfig()
    width: int = 128
    sequence_attention: bool = True
    layers: int = 2
    heads: int = 4
    dropout: float = 0.1
    modality_attention: bool = True
    head: HeadConfig = HeadConfig()


class StageConfig(_Strict):
    enabled: bool = True
    epochs: int = Field(default=1, ge=1)
    lr: float = Field(default=1e-4, gt=0, allow_inf_nan=False)
    weight_decay: float = Field(default=1e-4, ge=0, allow_inf_nan=False)
    batch_size: int = Field(default=64, ge=1, description="Global batch size, split over workers.")
    warmup_steps: int = Field(default=0, ge=0)
    cache: str | None = Field(
        default=None,
        description="warmup and tuning only: a cache folder from `cmaclip cache`, or `build` to "
        "build one in the run folder before the stage; null runs the frozen part every epoch.",
    )


def _default_stages() -> dict[str, StageConfig]:
    return {name: StageConfig() for name in STAGES}


class DataConfig(_Strict):
    path: str = "data/emoji"
    tasks: list[str] | None = Field(
        default=None, description="Tasks to train; all tasks of dataset.json when null."
    )
    loss_weights: dict[str, Annotated[float, Field(ge=0, allow_inf_nan=False)]] = Field(
        default_factory=dict
    )
    preprocess_in: Literal["actors", "worker"] = Field(
        default="actors",
        description=(
            "Where images are decoded and titles tokenized for training: in Ray Data actors "
            "(large images, CPUs to spare beside the trainers) or in each training worker, as "
            "it collates a batch (small images, few CPUs: no actor to start every epoch)."
        ),
    )
    preprocess_concurrency: int = Field(default=1, ge=1, description="Ray Data decoding actors.")
    preprocess_cpus: float = Field(
        default=0.5, gt=0, description="CPUs reserved per decoding actor; fractional on a laptop."
    )
    read_cpus: float = Field(default=0.25, gt=0, description="CPUs reserved per Parquet read task.")
    shuffle_buffer: int = Field(
        default=2048, ge=0, description="Rows in each worker's local shuffle buffer; 0 is off."
    )
    max_skipped_fraction: float = Field(
        default=DEFAULT_MAX_SKIPPED_FRACTION,
        ge=0,
        le=1,
        description="Error budget: stop when more of the rows read than this are skipped.",
    )


class ScalingConfig(_Strict):
    num_workers: int = Field(default=1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(default=1.0, gt=0)
    torch_threads: int | None = Field(
        default=None, description="torch.set_num_threads per worker; the worker's CPUs if null."
    )
    # speed switches for GPU workers; the CPU path leaves them off
    precision: Literal["fp32", "bf16"] = Field(
        default="fp32",
        description="bf16: forward passes and losses under torch.autocast in bfloat16 (GPUs "
        "from Ampere on); weights, gradients and the optimizer state stay float32.",
    )
    channels_last: bool = Field(
        default=False,
        description="Images and the patch embedding in channels-last memory order, which GPU "
        "convolution kernels prefer.",
    )
    pin_memory: bool = Field(
        default=False,
        description="Page-locked host batches, so that copies to the GPU overlap the step.",
    )
    compile: bool = Field(
        default=False,
        description="torch.compile each worker's model; the first steps of every stage pay "
        "for compiling.",
    )

    @model_validator(mode="after")
    def _check_pin_memory(self) -> ScalingConfig:
        if self.pin_memory and not self.use_gpu:
            raise ValueError(
                "scaling.pin_memory pins batches for copies to a GPU: set scaling.use_gpu: true, "
                "or leave pin_memory off on CPU workers"
            )
        return self


class TrackingConfig(_Strict):
    experiment: str = "cmaclip"
    tracking_uri: str | None = Field(
        default=None,
        description="MLflow tracking URI; MLFLOW_TRACKING_URI, else sqlite in the project home.",
    )


class RunConfig(_Strict):
    name: str = "cmaclip"
    root: str = "runs"
    storage_path: str | None = Field(
        default=None, description="Ray Train storage for checkpoints; <root>/<name>/ray if null."
    )
    seed: int = 0
    max_failures: int = Field(
        default=0,
        ge=-1,
        description="Ray Train's FailureConfig.max_failures: how often a stage's worker group is "
        "restarted after a worker dies or raises, each time from the stage's latest checkpoint; "
        "-1 retries without end, 0 ends the run at the first failure (resubmitting the run name "
        "then resumes it).",
    )
    collective_timeout_s: int = Field(
        default=1800,
        ge=1,
        description="Seconds a worker waits in one collective (gradient all-reduce, metric "
        "sums) before it gives up; a stuck peer then fails the stage instead of hanging it.",
    )
    init_encoders: str | None = Field(
        default=None,
        description="A checkpoint or model folder whose CLIP encoders the run starts from (e.g. "
        "another run's checkpoints/contrastive); fusion and heads start fresh.",
    )


class Config(_Strict):
    run: RunConfig = RunConfig()
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    stages: dict[str, StageConfig] = Field(default_factory=_default_stages)
    selection_metric: Literal["macro_accuracy", "val_loss"] = "macro_accuracy"
    scaling: ScalingConfig = ScalingConfig()
    tracking: TrackingConfig = TrackingConfig()

    @model_validator(mode="after")
    def _check_stages(self) -> Config:
        unknown = set(self.stages) - set(STAGES)
        if unknown:
            raise ValueError(f"unknown stage(s) {sorted(unknown)}; stages are {list(STAGES)}")
        for name in STAGES:
            self.stages.setdefault(name, StageConfig())
        cached = [n for n in ("contrastive", "end_to_end") if self.stages[n].cache is not None]
        if cached:
            raise ValueError(
                f"stages.{cached[0]}.cache: only warmup and tuning can use a cache (their "
                f"frozen part is what the cache holds)"
            )
        if not any(self.stages[name].enabled for name in STAGES[1:]):
            raise ValueError("enable at least one of the stages warmup, end_to_end, tuning")
        return self

    def enabled_stages(self) -> list[str]:
        """Stage names in schedule order, skipping disabled ones."""
        return [name for name in STAGES if self.stages[name].enabled]

    def run_dir(self) -> Path:
        return resolve_path(self.run.root) / self.run.name

    def storage_path(self) -> Path:
        if self.run.storage_path:
            return resolve_path(self.run.storage_path)
        return self.run_dir() / "ray"

    def data_path(self) -> Path:
        return resolve_path(self.data.path)


def project_home() -> Path:
    """Where relative paths point: `$CMACLIP_HOME`, else the current folder."""
    return Path(os.environ.get(HOME_ENV) or os.getcwd()).resolve()


def resolve_path(path: str | Path) -> Path:
    path = Path(path).expanduser()
    return path if path.is_absolute() else project_home() / path


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `key.sub=value` overrides; values are parsed as YAML (`3`, `1e-4`, `false`)."""
    raw = copy.deepcopy(raw)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} is not of the form key.sub=value")

        node = raw
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {part!r} is not a section")
        try:
            node[parts[-1]] = yaml.safe_load(value)
        except yaml.YAMLError as error:
            raise ValueError(f"override {item!r}: the value is not valid YAML ({error})") from None
    return raw


def read_yaml_mapping(path: str | Path, what: str = "config") -> dict[str, Any]:
    """A YAML file whose top level is a mapping; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ValueError(f"{path}: not valid YAML: {error}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: the top level must be a mapping")
    return raw


def validation_message(where: str | Path, error: ValidationError) -> str:
    """`FILE: field.sub: message; ...` for every field pydantic refused."""
    lines = [f"{'.'.join(str(p) for p in e['loc']) or '<top>'}: {e['msg']}" for e in error.errors()]
    return f"{where}: " + "; ".join(lines)


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config, apply overrides and validate it.

    Errors name the file and the offending field, for example
    `configs/emoji.yaml: stages.warmup.lr: Input should be greater than 0`.
    """
    raw = read_yaml_mapping(path) if path is not None else {}
    raw = apply_overrides(raw, overrides or [])
    try:
        return Config.model_validate(raw)
    except ValidationError as error:
        raise ValueError(validation_message(path or "config", error)) from None


def config_to_dict(config: Config) -> dict[str, Any]:
    return config.model_dump(mode="json")


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested config for MLflow parameters: `stages.warmup.lr -> 1e-4`."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat
