"""The paper's comparisons on your data: the ablation table and accuracy under noise.

`ablation` trains and evaluates, on the same splits, the variants of `VARIANTS`: CLIP zero-shot
before and after contrastive training, a linear probe on frozen CLIP features, and CMA-CLIP
with and without each of its two attention modules. The CMA-CLIP variants are training runs
(`cmaclip.training.run.train`, through Ray Train, as a Ray job runs it). The contrastive stage
is trained once and shared: every variant starts from the same contrastive checkpoint's encoders
(`run.init_encoders`) with its own fusion and heads, either one given with `--contrastive` or
the one the full CMA-CLIP run trains first. Results go to `<root>/<name>/ablation.json` and
`ablation.md`, each variant's report beside them, all under one MLflow parent run.

`noise_grid` scores those variants again with a fraction of the test rows corrupted, over a grid
of rates, and draws accuracy against the rate per task and variant.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from cmaclip import tracking
from cmaclip.config import Config, config_to_dict, flatten, resolve_path
from cmaclip.data.shards import DEFAULT_MAX_SKIPPED_FRACTION, read_dataset_info

logger = logging.getLogger(__name__)

ABLATION_FILE = "ablation.json"
METRICS = {"accuracy": "acc", "macro_f1": "macro-F1", "recall_at_precision_0.9": "R@P0.9"}


@dataclass(frozen=True)
class Variant:
    """One row of the ablation table."""

    name: str
    description: str
    kind: Literal["zero_shot", "probe", "cma"]
    # which CLIP encoders a baseline uses: as configured (pretrained or fresh) or contrastive
    encoders: Literal["configured", "contrastive"] = "contrastive"
    sequence_attention: bool = True
    modality_attention: bool = True


VARIANTS: dict[str, Variant] = {
    variant.name: variant
    for variant in (
        Variant("zero_shot_clip", "CLIP zero-shot", "zero_shot", encoders="configured"),
        Variant("finetuned_clip", "CLIP contrastively fine-tuned, zero-shot", "zero_shot"),
        Variant("linear_probe", "linear probe on frozen CLIP features", "probe"),
        Variant("cma_no_modality", "CMA-CLIP without modality-wise attention", "cma",
                modality_attention=False),
        Variant("cma_no_sequence", "CMA-CLIP without sequence-wise attention", "cma",
                sequence_attention=False),
        Variant("cma_no_both", "CMA-CLIP without either attention", "cma",
                sequence_attention=False, modality_attention=False),
        Variant("cma_clip", "CMA-CLIP", "cma"),
    )
}  # fmt: skip


def ablation_dir(config: Config, name: str | None = None) -> Path:
    return resolve_path(config.run.root) / (name or f"{config.run.name}-ablation")


def _variant_config(config: Config, variant: Variant, root: Path, init: Path | None) -> Config:
    raw = config_to_dict(config)
    raw["run"].update(root=str(root), name=variant.name, storage_path=None)
    raw["model"].update(
        sequence_attention=variant.sequence_attention,
        modality_attention=variant.modality_attention,
    )
    if init is not None:
        raw["run"]["init_encoders"] = str(init)
        raw["stages"]["contrastive"]["enabled"] = False
    return Config.model_validate(raw)


def _load_encoders(folder: Path):
    from cmaclip.export import load_model

    model, _ = load_model(folder)
    return model


def baseline_scorer(variant: Variant, folder: Path, encoders_from: Path, *, template: str):
    """The scorer of a baseline variant; a probe is read from `folder/probe.npz`."""
    from cmaclip.baselines import LinearProbe, ZeroShotScorer
    from cmaclip.export import input_spec

    model = _load_encoders(encoders_from)
    spec = input_spec(model)
    if variant.kind == "zero_shot":
        return ZeroShotScorer(model.encoders, spec, template=template), spec
    return LinearProbe(model.encoders, spec).load(folder / "probe.npz"), spec


def ablation(
    config: Config,
    *,
    name: str | None = None,
    contrastive: Path | None = None,
    only: list[str] | None = None,
    resume: bool = False,
    template: str | None = None,
    probe_c: float = 1.0,
) -> dict[str, Any]:
    """Train and evaluate every variant on the test split; returns the table as a dict.

    `only` runs just those variants (the others are read back when `resume` finds them
    finished); `resume` keeps every variant whose report is already there.
    """
    from cmaclip.baselines import DEFAULT_TEMPLATE, LinearProbe, ZeroShotScorer
    from cmaclip.evaluate import evaluate_scorer, write_report
    from cmaclip.export import input_spec, save_model
    from cmaclip.model.cmaclip import CMACLIP
    from cmaclip.training.run import select_tasks
    from cmaclip.training.run import train as train_run

    template = template or DEFAULT_TEMPLATE
    budget = config.data.max_skipped_fraction
    unknown = sorted(set(only or []) - set(VARIANTS))
    if unknown:
        raise ValueError(f"--only {unknown}: unknown variant(s); variants are {list(VARIANTS)}")
    wanted = [v for v in VARIANTS.values() if not only or v.name in only]
    root = ablation_dir(config, name)
    root.mkdir(parents=True, exist_ok=True)
    info = read_dataset_info(config.data_path())
    tasks = select_tasks(config, info)
    state_path = root / ABLATION_FILE
    state: dict[str, Any] = (
        json.loads(state_path.read_text()) if resume and state_path.is_file() else {}
    )
    state.setdefault("variants", {})

    # the encoders as configured (pretrained or a fresh init), for the zero-shot CLIP row
    torch.manual_seed(config.run.seed)
    configured = save_model(CMACLIP(config.model, tasks), root / "configured", {"stage": "init"})

    if contrastive is not None:
        contrastive = resolve_path(contrastive)
        if not (contrastive / "model.safetensors").is_file():
            raise FileNotFoundError(f"--contrastive {contrastive}: no model.safetensors there")
        source = "given"
    elif config.stages["contrastive"].enabled:
        contrastive = root / "cma_clip" / "checkpoints" / "contrastive"
        source = "trained by the cma_clip variant"
        # the full model trains the contrastive stage that the others then start from
        wanted.sort(key=lambda v: v.name != "cma_clip")
    else:
        contrastive, source = None, "none: every variant starts from the configured encoders"

    uri = tracking.tracking_uri(config.tracking.tracking_uri)
    parent = state.get("mlflow_run_id") or tracking.start_run(
        uri, config.tracking.experiment, root.name, tags={"cmaclip.experiment": "ablation"}
    )
    state.update(
        config=config_to_dict(config), data=str(config.data_path()), template=template,
        contrastive=str(contrastive) if contrastive else None, contrastive_source=source,
        configured=str(configured), mlflow_run_id=parent,
    )  # fmt: skip
    if not resume:
        tracking.log_params(uri, parent, flatten(config_to_dict(config)))
    status = "FAILED"
    try:
        for variant in wanted:
            folder = root / variant.name
            done = state["variants"].get(variant.name)
            if resume and done and (folder / "report.json").is_file():
                logger.info("ablation: %s already done (%s)", variant.name, folder)
                continue
            started = time.perf_counter()
            logger.info("ablation: %s (%s)", variant.name, variant.description)

            if variant.kind == "cma":
                trains_contrastive = variant.name == "cma_clip" and source.startswith("trained")
                init = None if trains_contrastive or contrastive is None else contrastive
                if init is not None and not (init / "model.safetensors").is_file():
                    raise FileNotFoundError(
                        f"{init}: the shared contrastive checkpoint is not there yet; run the "
                        f"cma_clip variant first (it trains it), or give --contrastive"
                    )
                report = train_run(_variant_config(config, variant, root, init),
                                   parent_run_id=parent)  # fmt: skip
                encoders = str(init or folder / "checkpoints" / "init")
            else:
                encoders_from = configured if variant.encoders == "configured" else contrastive
                if encoders_from is None or not (Path(encoders_from) / "model.json").is_file():
                    encoders_from = configured
                model = _load_encoders(Path(encoders_from))
                spec = input_spec(model)
                extra = {}
                if variant.kind == "probe":
                    probe = LinearProbe(model.encoders, spec)
                    extra["probe"] = probe.fit(config.data_path(), split="train", c=probe_c,
                                               max_skipped_fraction=budget)  # fmt: skip
                    probe.save(folder / "probe.npz")
                    scorer = probe
                else:
                    scorer = ZeroShotScorer(model.encoders, spec, template=template)
                evaluation = evaluate_scorer(scorer, spec, config.data_path(), split="test",
                                             max_skipped_fraction=budget)  # fmt: skip
                evaluation.report.update(variant=variant.name, **extra)
                write_report(evaluation, folder / "report.json")
                report = evaluation.report
                encoders = str(encoders_from)

            seconds = round(time.perf_counter() - started, 1)
            state["variants"][variant.name] = {
                "description": variant.description,
                "kind": variant.kind,
                "encoders": encoders,
                "folder": str(folder),
                "seconds": seconds,
                "tasks": report["tasks"],
            }
            metrics = {
                f"{variant.name}/{task}/{metric}": values[metric]
                for task, values in report["tasks"].items()
                for metric in METRICS
                if metric in values
            }
            tracking.log_metrics(uri, parent, {**metrics, f"{variant.name}/seconds": seconds}, 0)
            state_path.write_text(json.dumps(state, indent=2))
            logger.info("ablation: %s done in %.0f s", variant.name, seconds)

        state["tasks"] = list(tasks)
        state_path.write_text(json.dumps(state, indent=2))
        (root / "ablation.md").write_text(format_ablation(state) + "\n")
        tracking.log_artifacts(uri, parent, state_path)
        tracking.log_artifacts(uri, parent, root / "ablation.md")
        status = "FINISHED"
        return state
    finally:
        tracking.end_run(uri, parent, status)


def format_ablation(state: dict[str, Any]) -> str:
    """The ablation table in Markdown: one row per variant, three metrics per task."""
    tasks = state.get("tasks") or list(next(iter(state["variants"].values()))["tasks"])
    header = ["variant"] + [f"{task} {short}" for task in tasks for short in METRICS.values()]
    header.append("seconds")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in VARIANTS:
        row = state["variants"].get(name)
        if row is None:
            continue
        cells = [row["description"]]
        for task in tasks:
            values = row["tasks"].get(task, {})
            cells += [f"{values[m]:.3f}" if m in values else "–" for m in METRICS]
        cells.append(f"{row['seconds']:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _scorer(state: dict[str, Any], name: str):
    """A finished variant's scorer, rebuilt from its folder."""
    from cmaclip.evaluate import ModelScorer
    from cmaclip.export import input_spec, load_model

    row = state["variants"][name]
    variant = VARIANTS[name]
    folder = Path(row["folder"])
    if variant.kind == "cma":
        model, _ = load_model(folder / "model")
        return ModelScorer(model), input_spec(model)
    return baseline_scorer(variant, folder, Path(row["encoders"]), template=state["template"])


def noise_grid(
    root: str | Path,
    *,
    kinds: list[str],
    rates: list[float],
    seed: int = 0,
    variants: list[str] | None = None,
) -> dict[str, Any]:
    """Test accuracy of each finished variant under each noise kind at each rate.

    Writes `noise.json`, `noise.md` and `noise.png` into the ablation folder, and logs them to a
    child run of the ablation's MLflow run.
    """
    from cmaclip.evaluate import evaluate_scorer
    from cmaclip.noise import NoiseSetting

    root = Path(root)
    state_path = root / ABLATION_FILE
    if not state_path.is_file():
        raise FileNotFoundError(f"{state_path}: not found; run `cmaclip experiment ablation` first")
    state = json.loads(state_path.read_text())
    names = [n for n in VARIANTS if n in state["variants"] and (not variants or n in variants)]
    if not names:
        raise ValueError(f"{state_path}: no finished variant to score (wanted {variants})")
    settings = [NoiseSetting(kind, rate) for kind in kinds for rate in rates]  # checks them
    # the ablation's error budget (an ablation.json older than it: the default)
    budget = state["config"]["data"].get("max_skipped_fraction", DEFAULT_MAX_SKIPPED_FRACTION)

    started = time.perf_counter()
    results: dict[str, Any] = {"seed": seed, "kinds": kinds, "rates": rates, "variants": {}}
    for name in names:
        scorer, spec = _scorer(state, name)
        per_kind: dict[str, dict[str, list[float]]] = {}
        clean = None
        for setting in settings:
            if setting.rate == 0 and clean is not None:
                report = clean
            else:
                noise = setting if setting.rate > 0 else None
                report = evaluate_scorer(
                    scorer, spec, state["data"], split="test", noise=noise, seed=seed,
                    max_skipped_fraction=budget,
                ).report  # fmt: skip
                if setting.rate == 0:
                    clean = report
            accuracies = per_kind.setdefault(setting.kind, {})
            for task, metrics in report["tasks"].items():
                accuracies.setdefault(task, []).append(metrics.get("accuracy", float("nan")))
        results["variants"][name] = {
            "description": VARIANTS[name].description,
            "accuracy": per_kind,
        }
        logger.info("noise grid: %s done", name)
    results["seconds"] = round(time.perf_counter() - started, 1)
    results["accuracy_lost"] = noise_summary(results)

    (root / "noise.json").write_text(json.dumps(results, indent=2))
    (root / "noise.md").write_text(format_noise(results) + "\n")
    figure = noise_figure(results, root / "noise.png")

    uri = tracking.tracking_uri(state["config"]["tracking"].get("tracking_uri"))
    experiment = state["config"]["tracking"]["experiment"]
    child = tracking.start_run(uri, experiment, f"{root.name}/noise",
                               parent_id=state.get("mlflow_run_id"),
                               tags={"cmaclip.experiment": "noise"})  # fmt: skip
    metrics = {
        f"{name}/{kind}/{task}/accuracy@{rate:g}": value
        for name, row in results["variants"].items()
        for kind, tasks in row["accuracy"].items()
        for task, values in tasks.items()
        for rate, value in zip(rates, values, strict=True)
    }
    tracking.log_metrics(uri, child, metrics, step=0)
    for path in (root / "noise.json", root / "noise.md", figure):
        tracking.log_artifacts(uri, child, path)
    tracking.end_run(uri, child)
    return results


def format_noise(results: dict[str, Any]) -> str:
    """Markdown: per kind, one row per variant and task, accuracy at each rate."""
    rates = results["rates"]
    lines = []
    for kind in results["kinds"]:
        lines += [f"**{kind}** (seed {results['seed']})", ""]
        lines.append("| variant | task | " + " | ".join(f"rate {r:g}" for r in rates) + " |")
        lines.append("|---|---|" + "---|" * len(rates))
        for row in results["variants"].values():
            for task, values in row["accuracy"][kind].items():
                cells = " | ".join(f"{v:.3f}" for v in values)
                lines.append(f"| {row['description']} | {task} | {cells} |")
        lines.append("")
    return "\n".join(lines).rstrip()


def noise_figure(results: dict[str, Any], out: Path) -> Path:
    """Accuracy against noise rate: a panel per (kind, task), a line per variant."""
    from cmaclip.reporting import plt

    kinds = results["kinds"]
    tasks = list(next(iter(results["variants"].values()))["accuracy"][kinds[0]])
    fig, axes = plt.subplots(len(kinds), len(tasks), figsize=(4.2 * len(tasks), 3.6 * len(kinds)),
                             dpi=100, squeeze=False, sharey=True)  # fmt: skip
    markers = "osD^v<>"
    for i, kind in enumerate(kinds):
        for j, task in enumerate(tasks):
            ax = axes[i][j]
            for n, row in enumerate(results["variants"].values()):
                ax.plot(results["rates"], row["accuracy"][kind][task], marker=markers[n % 7],
                        label=row["description"])  # fmt: skip
            ax.set_title(f"{task} under {kind}")
            ax.set_xlabel("share of test rows corrupted")
            ax.set_ylabel("accuracy")
            ax.set_ylim(0, 1.02)
            ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=9)
    fig.tight_layout(rect=(0, 0.1 if len(labels) > 4 else 0.06, 1, 1))
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def noise_summary(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Per variant and kind, the mean over tasks of accuracy lost from clean to the top rate."""
    summary: dict[str, dict[str, float]] = {}
    for name, row in results["variants"].items():
        summary[name] = {
            kind: float(np.mean([values[0] - values[-1] for values in tasks.values()]))
            for kind, tasks in row["accuracy"].items()
        }
    return summary
