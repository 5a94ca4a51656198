"""Config loading: the shipped YAML files validate, overrides apply, errors name the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from cmaclip.config import STAGES, load_config, resolve_path

CONFIGS = Path(__file__).parent.parent / "configs"


@pytest.mark.parametrize("name", ["emoji.yaml", "vit-b-32.yaml"])
def test_shipped_configs_validate(name):
    config = load_config(CONFIGS / name)
    assert config.enabled_stages()[0] in STAGES


def test_overrides_are_parsed_as_yaml():
    config = load_config(
        CONFIGS / "emoji.yaml",
        ["stages.warmup.lr=3e-4", "stages.contrastive.enabled=false", "run.name=other"],
    )
    assert config.stages["warmup"].lr == 3e-4
    assert config.enabled_stages() == ["warmup", "end_to_end", "tuning"]
    assert config.run.name == "other"


def test_errors_name_the_field():
    with pytest.raises(ValueError, match=r"stages\.warmup\.lr"):
        load_config(CONFIGS / "emoji.yaml", ["stages.warmup.lr=-1"])
    with pytest.raises(ValueError, match="unknown stage"):
        load_config(None, ["stages.pretrain.epochs=1"])
    with pytest.raises(ValueError, match="model.colour"):
        load_config(None, ["model.colour=1"])
    with pytest.raises(ValueError, match="key.sub=value"):
        load_config(None, ["nonsense"])


def test_relative_paths_follow_the_project_home(monkeypatch, tmp_path):
    monkeypatch.setenv("CMACLIP_HOME", str(tmp_path))
    assert resolve_path("runs") == tmp_path / "runs"
    assert resolve_path("/abs/path") == Path("/abs/path")


def test_cli_reports_a_bad_config_in_one_line(capsys, tmp_path):
    from cmaclip.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--config", str(tmp_path / "missing.yaml")])
    assert exit_info.value.code == 2
    assert (
        capsys.readouterr().err.strip()
        == f"error: config file not found: {tmp_path / 'missing.yaml'}"
    )


def test_yaml_errors_name_the_file_or_override(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("run: [unclosed\n  name: x\n")
    with pytest.raises(ValueError, match="broken.yaml: not valid YAML"):
        load_config(broken)
    with pytest.raises(ValueError, match="stages.warmup.lr=\\["):
        load_config(None, ["stages.warmup.lr=["])


def test_stages_left_out_keep_their_defaults(tmp_path):
    path = tmp_path / "partial.yaml"
    path.write_text("stages:\n  contrastive: {enabled: false}\n")
    config = load_config(path, ["stages.warmup.lr=1e-3"])
    assert config.enabled_stages() == ["warmup", "end_to_end", "tuning"]


def test_pinned_batches_need_a_gpu():
    with pytest.raises(ValueError, match="scaling.use_gpu"):
        load_config(CONFIGS / "emoji.yaml", ["scaling.pin_memory=true"])
    config = load_config(
        CONFIGS / "emoji.yaml", ["scaling.pin_memory=true", "scaling.use_gpu=true"]
    )
    assert config.scaling.pin_memory and config.scaling.precision == "fp32"
