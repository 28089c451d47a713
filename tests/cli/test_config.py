"""Configs: YAML then flags, validation before any work, --help from field docstrings."""

import pytest
import yaml

from tether.cli import main
from tether.config import SFTConfig, config_help, field_docs, load_config
from tether.errors import ConfigError

BASE = ["--model", "m", "--data", "d.jsonl", "--output-dir", "out"]


def test_flags_override_yaml_and_underscores_work(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"lr": 1e-3, "batch_size": 4, "max-length": 64, "model": "m",
                                    "data": "d.jsonl", "output_dir": "out"}))
    cfg = load_config(SFTConfig, ["--config", str(path), "--batch_size", "2", "--lora-r=8",
                                  "--gradient-checkpointing", "--no-packing"])
    assert (cfg.lr, cfg.batch_size, cfg.max_length, cfg.lora_r) == (1e-3, 2, 64, 8)
    assert cfg.gradient_checkpointing is True and cfg.packing is False


def test_unknown_field_is_rejected_with_a_suggestion():
    with pytest.raises(ConfigError, match=r"unknown option --learning-rate.*Did you mean --lr\?"):
        load_config(SFTConfig, BASE + ["--learning-rate", "1"])
    with pytest.raises(ConfigError, match="unknown option --batchsize.*--batch-size"):
        load_config(SFTConfig, BASE + ["--batchsize", "1"])


def test_wrong_types_are_rejected(tmp_path):
    with pytest.raises(ConfigError, match="--batch-size must be an integer"):
        load_config(SFTConfig, BASE + ["--batch-size", "four"])
    with pytest.raises(ConfigError, match="--dtype must be one of"):
        load_config(SFTConfig, BASE + ["--dtype", "fp8"])
    path = tmp_path / "c.yaml"
    path.write_text("epochs: 1.5\n")
    with pytest.raises(ConfigError, match="--epochs must be an integer"):
        load_config(SFTConfig, BASE + ["--config", str(path)])
    path.write_text("packing: 3\n")
    with pytest.raises(ConfigError, match="--packing must be true or false"):
        load_config(SFTConfig, BASE + ["--config", str(path)])


def test_semantic_validation_runs_before_work():
    with pytest.raises(ConfigError, match="--model is required"):
        load_config(SFTConfig, ["--data", "d", "--output-dir", "o"])
    with pytest.raises(ConfigError, match="--lr must be > 0"):
        load_config(SFTConfig, BASE + ["--lr", "0"])


def test_every_field_has_a_docstring_shown_in_help():
    docs = field_docs(SFTConfig)
    text = config_help(SFTConfig, "tether sft")
    from dataclasses import fields

    for f in fields(SFTConfig):
        assert docs.get(f.name), f"{f.name} has no docstring"
        assert "--" + f.name.replace("_", "-") in text


def test_cli_reports_config_errors_without_traceback(capsys):
    assert main(["sft", "--model", "m", "--data", "d", "--output-dir", "o", "--bogus", "1"]) == 2
    assert "unknown option --bogus" in capsys.readouterr().err
    assert main(["nosuchstage"]) == 2
    assert main(["sft", "--help"]) == 0
    assert "--gradient-checkpointing" in capsys.readouterr().out


def test_help_piped_into_a_reader_that_stops_early_is_not_an_error():
    import subprocess
    import sys

    code = "import sys; from tether.cli import main; sys.exit(main(['ppo', '--help']))"
    proc = subprocess.run(f'"{sys.executable}" -c "{code}" | head -n 1', shell=True,
                          capture_output=True, text=True, timeout=60)
    assert proc.stdout.startswith("usage: tether ppo")
    assert "Traceback" not in proc.stderr and "BrokenPipeError" not in proc.stderr


def test_a_negated_flag_the_stage_does_not_have_is_named_as_unknown():
    from tether.config import BoNConfig

    args = ["--policy", "p", "--reward-model", "r", "--prompts", "x", "--output-dir", "o"]
    with pytest.raises(ConfigError, match="unknown option --no-tensorboard for BoNConfig"):
        load_config(BoNConfig, args + ["--no-tensorboard"])
    assert load_config(BoNConfig, args + ["--no-progress"]).progress is False


def test_a_run_directorys_own_config_yaml_feeds_back_to_its_stage_only(tmp_path):
    from tether.config import RMConfig, save_config

    cfg = load_config(SFTConfig, ["--model", "m", "--data", "d.jsonl", "--output-dir", "out",
                                  "--lr", "0.0003"])
    path = save_config(cfg, tmp_path)
    assert yaml.safe_load(path.read_text())["stage"] == "SFTConfig"
    again = load_config(SFTConfig, ["--config", str(path), "--max-steps", "7"])
    assert again.lr == 0.0003 and again.max_steps == 7 and again.model == "m"
    with pytest.raises(ConfigError, match="written for SFTConfig, not RMConfig"):
        load_config(RMConfig, ["--config", str(path)])


def test_ppo_batch_splits_and_schedule_are_validated():
    from tether.config import PPOConfig

    ppo = ["--policy", "p", "--reward-model", "r", "--prompts", "x.jsonl", "--output-dir", "o",
           "--batch-size", "8"]
    with pytest.raises(ConfigError, match="--micro-batch-size must divide the minibatch \\(4"):
        load_config(PPOConfig, ppo + ["--mini-batch-size", "4", "--micro-batch-size", "3"])
    with pytest.raises(ConfigError, match="--warmup-ratio must be in"):
        load_config(PPOConfig, ppo + ["--warmup-ratio", "1.0"])
    cfg = load_config(PPOConfig, ppo + ["--mini-batch-size", "4", "--micro-batch-size", "2"])
    assert (cfg.minibatch, cfg.micro, cfg.reuses_first_forward, cfg.optimizer_steps) == (4, 2, False, 800)
    assert load_config(PPOConfig, ppo).reuses_first_forward  # one minibatch, one micro-batch
