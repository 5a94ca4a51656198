"""Faults during training: atomic writes, refused mismatches, resumable checkpoints and runs.

The fast tests need no Ray. The slow ones train on the emoji-mini fixture through Ray Train with
two workers: one kills a worker process with SIGKILL mid-stage, one interrupts a run and submits
it again, one gives the workers shards of very different sizes.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from cmaclip import export
from cmaclip.config import ModelConfig, config_to_dict, load_config
from cmaclip.data.shards import read_dataset_info, shard_files
from cmaclip.export import load_model, load_weights, save_model
from cmaclip.model.cmaclip import CMACLIP
from cmaclip.training import loop
from cmaclip.training.run import config_changes, finished_stage, train

CONFIGS = Path(__file__).parent.parent / "configs"


def _model(config: ModelConfig, tasks: dict[str, list[str]], seed: int = 0) -> CMACLIP:
    torch.manual_seed(seed)
    return CMACLIP(config, tasks).eval()


def _tasks(shards: Path) -> dict[str, list[str]]:
    return read_dataset_info(shards)["tasks"]


# -- atomic writes and refused mismatches ---------------------------------------------------


def test_a_save_that_fails_midway_leaves_the_previous_model(
    tmp_path, tiny_model_config, emoji_shards, monkeypatch
):
    first = _model(tiny_model_config, _tasks(emoji_shards), seed=0)
    save_model(first, tmp_path / "model", {"version": 1})

    def half_written(state, path):
        Path(path).write_bytes(b"\x00" * 1000)  # a truncated file, then the disk fills up
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export, "save_file", half_written)
    with pytest.raises(OSError, match="No space left"):
        save_model(_model(tiny_model_config, _tasks(emoji_shards), seed=1), tmp_path / "model")

    loaded, meta = load_model(tmp_path / "model")
    assert meta["version"] == 1
    expected = first.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in loaded.state_dict().items())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no staging folder left


def test_weights_of_another_architecture_are_refused_naming_each_difference(
    tmp_path, tiny_model_config, emoji_shards
):
    tasks = _tasks(emoji_shards)
    save_model(_model(tiny_model_config, tasks), tmp_path / "model")

    # equal shapes, other computation: 2 attention heads instead of 4; and one layer more
    other = tiny_model_config.model_copy(update={"heads": 2, "layers": 2})
    with pytest.raises(ValueError, match=r"another model: model\.heads: checkpoint 4, this model"):
        load_weights(_model(other, tasks), tmp_path / "model")
    with pytest.raises(ValueError, match=r"model\.layers: checkpoint 1, this model 2"):
        load_weights(_model(other, tasks), tmp_path / "model")

    fewer = {task: tasks[task] for task in ("category", "skin_tone")}
    with pytest.raises(ValueError, match=r"tasks: checkpoint \['category', 'subcategory'"):
        load_weights(_model(tiny_model_config, fewer), tmp_path / "model")

    # only the encoders are loaded: other fusion settings are fine, as a search trial needs
    load_weights(_model(other, tasks), tmp_path / "model", parts=("encoders.",))


def test_a_model_folder_the_code_cannot_read_is_refused_by_name(
    tmp_path, tiny_model_config, emoji_shards
):
    save_model(_model(tiny_model_config, _tasks(emoji_shards)), tmp_path / "model")
    meta_path = tmp_path / "model" / "model.json"
    meta = json.loads(meta_path.read_text())

    # model.json says the heads' hidden layer is 128 wide, the weights are 256 wide
    head = {**meta["model"]["head"], "hidden": 128}
    meta_path.write_text(json.dumps({**meta, "model": {**meta["model"], "head": head}}))
    with pytest.raises(
        ValueError,
        match=r"do not fit this model: heads\.category\.\S+ \[256\] in the file, \[128\]",
    ):
        load_model(tmp_path / "model")

    meta_path.write_text(json.dumps({**meta, "model": {**meta["model"], "gating": True}}))
    with pytest.raises(ValueError, match=r"model\.json: model: gating: Extra inputs"):
        load_model(tmp_path / "model")

    meta_path.write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(ValueError, match=r"format_version 99, but this code .* reads up to 1"):
        load_model(tmp_path / "model")


class _Payload:
    """Something a pickle can carry besides tensors: code that would run on load."""

    def __reduce__(self):
        return (os.system, ("echo unpickled",))


def test_a_checkpoint_resumes_optimizer_and_schedule_without_unpickling(
    tmp_path, tiny_model_config, emoji_shards
):
    model = _model(tiny_model_config, _tasks(emoji_shards))
    params = model.set_stage("tuning")
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, loop._lr_lambda(3, 20))
    for _ in range(5):
        optimizer.zero_grad()
        sum(p.square().sum() for p in params).backward()
        optimizer.step()
        schedule.step()
    loop._save_checkpoint(
        str(tmp_path), model, optimizer, schedule, stage="tuning", epoch=2, world=2
    )

    again = _model(tiny_model_config, _tasks(emoji_shards), seed=1)
    load_weights(again, tmp_path)
    state = loop._load_training_state(tmp_path, "tuning")
    optimizer2 = torch.optim.AdamW(again.set_stage("tuning"), lr=1e-3)
    schedule2 = torch.optim.lr_scheduler.LambdaLR(optimizer2, loop._lr_lambda(3, 20))
    optimizer2.load_state_dict(state["optimizer"])
    schedule2.load_state_dict(state["schedule"])

    assert state["epoch"] == 2 and schedule2.last_epoch == 5
    assert schedule2.get_last_lr() == schedule.get_last_lr()
    first_moment = optimizer.state_dict()["state"][0]["exp_avg"]
    assert torch.equal(optimizer2.state_dict()["state"][0]["exp_avg"], first_moment)
    with pytest.raises(ValueError, match="a checkpoint of stage 'tuning', not 'warmup'"):
        loop._load_training_state(tmp_path, "warmup")

    torch.save({"stage": "tuning", "payload": _Payload()}, tmp_path / loop.TRAINING_STATE)
    with pytest.raises(ValueError, match="training_state.pt: not a training state this code"):
        loop._load_training_state(tmp_path, "tuning")


def _worker_takes_agreed_steps(rank: int, world: int, port: int, counts, results) -> None:
    import datetime as dt

    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
        timeout=dt.timedelta(seconds=15),
    )  # fmt: skip
    steps = 0
    for _ in loop.agreed_batches(iter(range(counts[rank]))):
        gradient = torch.ones(4)
        dist.all_reduce(gradient)  # what DDP does in every backward pass
        steps += 1
    results[rank] = steps
    dist.destroy_process_group()


def test_workers_with_uneven_shards_take_the_same_steps():
    """7 batches on one worker, 4 on the other: both stop after 4, none waits for the timeout."""
    import multiprocessing
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # forked, not spawned: the children start with this process's imports in a fraction of a second
    context = multiprocessing.get_context("fork")
    results = context.Manager().dict()
    workers = [
        context.Process(target=_worker_takes_agreed_steps, args=(rank, 2, port, [7, 4], results))
        for rank in range(2)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
    assert [worker.exitcode for worker in workers] == [0, 0]
    assert dict(results) == {0: 4, 1: 4}


# -- resubmitting a run, without Ray ----------------------------------------------------------


def _config(shards: Path, root: Path, name: str, *extra: str):
    return load_config(
        CONFIGS / "emoji.yaml",
        [
            f"data.path={shards}",
            f"run.root={root}",
            f"run.name={name}",
            "scaling.num_workers=2",
            "scaling.cpus_per_worker=0.25",
            "scaling.torch_threads=1",
            "data.preprocess_cpus=0.25",
            "model.layers=1",
            "stages.contrastive.enabled=false",
            "stages.end_to_end.enabled=false",
            *extra,
        ],
    )


def test_a_resubmission_with_another_config_is_refused_naming_the_keys(tmp_path, emoji_shards):
    before = _config(emoji_shards, tmp_path, "changed")
    run_dir = before.run_dir()
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config_to_dict(before)))

    # more workers, another failure policy or error budget are fine; another learning rate is not
    after = _config(emoji_shards, tmp_path, "changed", "stages.warmup.lr=0.002",
                    "model.heads=2", "scaling.num_workers=1", "run.max_failures=3",
                    "data.max_skipped_fraction=0.9")  # fmt: skip
    assert config_changes(config_to_dict(before), config_to_dict(after)) == [
        "model.heads: 4 -> 2",
        "stages.warmup.lr: 0.001 -> 0.002",
    ]
    with pytest.raises(
        ValueError,
        match=r"submitted before with another config: model\.heads: 4 -> 2; stages\.warmup\.lr: "
        r"0\.001 -> 0\.002\. .*--restart",
    ):
        train(after)
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.yaml"]

    # a config saved before a key existed: the key's default is no change
    saved = config_to_dict(before)
    del saved["run"]["seed"]
    (run_dir / "config.yaml").write_text(yaml.safe_dump(saved))
    assert "run.seed" not in str(pytest.raises(ValueError, train, after).value)


def test_a_finished_run_resubmitted_does_nothing_and_says_so(tmp_path, emoji_shards):
    import ray

    from cmaclip.cli import app

    config = _config(emoji_shards, tmp_path, "done")
    run_dir = config.run_dir()
    run_dir.mkdir(parents=True)
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump(config_to_dict(config)))
    shutil.copy(config_file, run_dir / "config.yaml")
    report = {"split": "test", "rows_read": 1, "rows_used": 1, "rows_skipped": 0,
              "finished": "2026-12-04T08:00:00+00:00",
              "tasks": {"category": {"accuracy": 0.97, "support": 1}}}  # fmt: skip
    (run_dir / "report.json").write_text(json.dumps(report))

    result = CliRunner().invoke(app, ["train", "--config", str(config_file)])
    assert result.exit_code == 0, result.output
    assert "run done had finished already (2026-12-04T08:00:00+00:00): nothing trained" in (
        result.output
    )
    assert "category" in result.output and "0.9700" in result.output
    assert not ray.is_initialized()
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.yaml", "report.json"]


# -- through Ray Train ------------------------------------------------------------------------


def _snapshot_epoch(storage: Path, stage: str) -> int:
    """The epoch of the latest checkpoint Ray Train has recorded for a stage (0: none yet)."""
    path = storage / stage / "checkpoint_manager_snapshot.json"
    try:
        latest = json.loads(path.read_text()).get("latest_checkpoint_result")
    except (FileNotFoundError, json.JSONDecodeError):
        return 0
    return int(latest["metrics"]["epoch"]) if latest else 0


class _Killer(threading.Thread):
    """Kills one Ray Train worker process with SIGKILL once a stage recorded epoch `after`."""

    def __init__(self, storage: Path, stage: str, after: int):
        super().__init__(daemon=True)
        self.storage, self.stage, self.after = storage, stage, after
        self.killed: int | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        import psutil

        # at once: with the next epoch's batches started during validation, a short epoch of
        # the emoji-mini fixture can end within a second of the last checkpoint
        while not self.stop.wait(0.05):
            if _snapshot_epoch(self.storage, self.stage) >= self.after:
                break
        else:
            return
        # the workers of this test's own Ray cluster: its raylet is a child of this process
        workers = [
            process.pid
            for process in psutil.Process().children(recursive=True)
            if "RayTrainWorker" in " ".join(process.cmdline())
        ]
        self.killed = max(workers)
        os.kill(self.killed, signal.SIGKILL)


def _history(config, stage: str, name: str) -> list[tuple[int, float]]:
    from mlflow.tracking import MlflowClient

    from cmaclip.tracking import tracking_uri

    state = json.loads((config.run_dir() / "run.json").read_text())
    client = MlflowClient(tracking_uri(None))
    run_id = state["mlflow"]["stages"][stage]
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, name))


@pytest.mark.slow
def test_a_killed_worker_is_replaced_and_the_stage_resumes_after_its_last_checkpoint(
    ray_cluster, emoji_shards, tmp_path
):
    # Ray Data's decoding actors here (the other runs preprocess in the workers)
    config = _config(emoji_shards, tmp_path, "killed", "stages.warmup.epochs=3",
                     "stages.tuning.enabled=false", "run.max_failures=1",
                     "data.preprocess_in=actors")  # fmt: skip
    killer = _Killer(config.storage_path(), "warmup", after=1)
    killer.start()
    try:
        report = train(config)
    finally:
        killer.stop.set()
        killer.join()

    assert killer.killed is not None, "no worker was killed"
    # epochs 1, 2, 3 reported once each; epochs 2 and 3 by the restarted workers, after epoch 1
    assert _history(config, "warmup", "resumed_after_epoch") == [(1, 0.0), (2, 1.0), (3, 1.0)]
    # the schedule went on where it stood: the learning rate of an uninterrupted run
    warmup = config.stages["warmup"]
    train_rows = read_dataset_info(emoji_shards)["rows"]["train"]
    steps = train_rows // 2 // (warmup.batch_size // 2)
    factor = loop._lr_lambda(warmup.warmup_steps, steps * warmup.epochs)
    lrs = dict(_history(config, "warmup", "lr"))
    assert lrs[2] == pytest.approx(warmup.lr * factor(2 * steps))
    assert lrs[3] == pytest.approx(warmup.lr * factor(3 * steps))

    # the range of an uninterrupted run (measured: validation loss 6.8 -> 5.0 over the three
    # epochs, test accuracy 0.74 for category, whose chance level is under 0.2)
    val_losses = [value for _, value in _history(config, "warmup", "val_loss")]
    assert val_losses[0] > val_losses[1] > val_losses[2] and val_losses[0] - val_losses[2] > 1.0
    assert report["rows_used"] + report["rows_skipped"] == report["rows_read"]
    assert report["tasks"]["category"]["accuracy"] > 0.5
    for metrics in report["tasks"].values():
        assert 0.0 < metrics["accuracy"] <= 1.0


@pytest.mark.slow
def test_a_resubmitted_run_keeps_finished_stages_and_resumes_the_unfinished_one(
    ray_cluster, emoji_shards, tmp_path
):
    config = _config(emoji_shards, tmp_path, "resubmitted", "stages.warmup.epochs=1",
                     "stages.tuning.epochs=2", "run.max_failures=0")  # fmt: skip
    run_dir = config.run_dir()

    # first submission: warmup finishes, a worker dies in tuning's second epoch, no retries
    killer = _Killer(config.storage_path(), "tuning", after=1)
    killer.start()
    try:
        with pytest.raises(RuntimeError, match="stage tuning failed after run.max_failures=0"):
            train(config)
    finally:
        killer.stop.set()
        killer.join()
    assert killer.killed is not None
    assert finished_stage(run_dir, "warmup") is not None
    assert finished_stage(run_dir, "tuning") is None
    assert not (run_dir / "report.json").exists()
    warmup_weights = load_file(str(run_dir / "checkpoints" / "warmup" / "model.safetensors"))

    # second submission: warmup kept as it was, tuning goes on with its second epoch
    report = train(config)
    assert report["submission"] == {"already_finished": False, "trained": ["tuning"],
                                    "kept": ["warmup"]}  # fmt: skip
    assert _history(config, "warmup", "epoch") == [(1, 1.0)]
    assert _history(config, "tuning", "resumed_after_epoch") == [(1, 0.0), (2, 1.0)]
    again = load_file(str(run_dir / "checkpoints" / "warmup" / "model.safetensors"))
    assert all(torch.equal(again[k], v) for k, v in warmup_weights.items())
    assert report["rows_used"] + report["rows_skipped"] == report["rows_read"]

    # third submission: nothing left to do
    third = train(config)
    assert third["submission"]["already_finished"] is True
    assert third["finished"] == report["finished"]
    assert _history(config, "tuning", "epoch") == [(1, 1.0), (2, 2.0)]


def _uneven_shards(source: Path, out: Path) -> int:
    """A copy of the shards whose training rows sit in files of 75%, 20% and 5% of the rows,
    with row groups of 7, 50 and 3 rows: Ray Data's blocks differ as much as the files."""
    shutil.copytree(source, out)
    files = shard_files(out, "train")
    table = pa.concat_tables(pq.read_table(path) for path in files)
    for path in files:
        os.remove(path)
    first, second = int(table.num_rows * 0.75), int(table.num_rows * 0.95)
    pieces = [(0, first, 7), (first, second, 50), (second, table.num_rows, 3)]
    for index, (start, stop, group) in enumerate(pieces):
        piece = table.slice(start, stop - start)
        pq.write_table(piece, out / f"train-{index:05d}.parquet", row_group_size=group)
    return table.num_rows


@pytest.mark.slow
def test_two_workers_on_uneven_blocks_take_equal_steps_and_finish(
    ray_cluster, emoji_shards, tmp_path
):
    shards = tmp_path / "uneven"
    rows = _uneven_shards(emoji_shards, shards)
    # with a GPU config's bf16 autocast and channels-last images: DDP still all-reduces
    # float32 gradients, and the step counts below do not depend on either
    config = _config(shards, tmp_path, "uneven", "stages.warmup.epochs=2",
                     "stages.tuning.enabled=false", "data.shuffle_buffer=64",
                     "run.collective_timeout_s=60", "scaling.precision=bf16",
                     "scaling.channels_last=true")  # fmt: skip
    report = train(config)

    steps = rows // 2 // (config.stages["warmup"].batch_size // 2)
    assert _history(config, "warmup", "train_steps_min") == [(1, steps), (2, steps)]
    assert _history(config, "warmup", "train_steps_max") == [(1, steps), (2, steps)]
    used = dict(_history(config, "warmup", "train_rows_used"))
    held_back = dict(_history(config, "warmup", "train_rows_held_back"))
    assert used[1] + held_back[1] == rows and used[1] == steps * 2 * 32
    assert report["rows_used"] + report["rows_skipped"] == report["rows_read"]
