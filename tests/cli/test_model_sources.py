"""A model option that is not an existing directory is named at once, for every stage and every
model option: exit 2 within seconds, the directory named first and the hub second, nothing
written. The hub is tried only when it can answer (HF_HUB_OFFLINE unset and its host reachable)."""

import time

import pytest

from tether.cli import main
from tether.models import source

MISSING = "no_such_model_dir"

# stage -> (its arguments with {X} for the option under test and {OK} for the other model
# options, the model options to test)
CASES = {
    "sft": ("--model {model} --data d.jsonl --output-dir out", ["model"]),
    "rm": ("--model {model} --data d.jsonl --output-dir out", ["model"]),
    "dpo": ("--model {model} --data d.jsonl --output-dir out", ["model"]),
    "kto": ("--model {model} --data d.jsonl --output-dir out", ["model"]),
    "score": ("--reward-model {reward_model} --data d.jsonl --output s.jsonl", ["reward_model"]),
    "ppo": ("--policy {policy} --reward-model {reward_model} --reference {reference} --prompts p.jsonl "
            "--output-dir out", ["policy", "reward_model", "reference"]),
    "grpo": ("--policy {policy} --reward-model {reward_model} --reference {reference} --prompts p.jsonl "
             "--output-dir out", ["policy", "reward_model", "reference"]),
    "rloo": ("--policy {policy} --reward-model {reward_model} --reference {reference} --prompts p.jsonl "
             "--output-dir out", ["policy", "reward_model", "reference"]),
    "online-dpo": ("--policy {policy} --judge {judge} --reference {reference} --prompts p.jsonl "
                   "--output-dir out", ["policy", "judge", "reference"]),
    "bon": ("--policy {policy} --reward-model {reward_model} --prompts p.jsonl --output-dir out",
            ["policy", "reward_model"]),
    "eval": ("--policy-a {policy_a} --policy-b {policy_b} --judge {judge} --reference {reference} "
             "--prompts p.jsonl --output e.json", ["policy_a", "policy_b", "judge", "reference"]),
    "judge": ("--judge {judge} --input i.jsonl --output l.jsonl", ["judge"]),
    "iterate": ("--policy {policy} --reference {reference} --reward-model {reward_model} --labeler judge "
                "--judge {judge} --prompts p.jsonl --output-dir out",
                ["policy", "reference", "reward_model", "judge"]),
}
ROWS = [(stage, option) for stage, (_, options) in CASES.items() for option in options]


def _argv(stage, option, ok):
    template, options = CASES[stage]
    values = {name: (MISSING if name == option else ok) for name in options}
    return [stage, *template.format(**values).split()]


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ok").mkdir()
    source._hub_verdict.clear()
    yield tmp_path
    source._hub_verdict.clear()


@pytest.mark.parametrize("stage, option", ROWS)
def test_a_missing_model_directory_is_named_at_once_offline(stage, option, workdir, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    code = main(_argv(stage, option, str(workdir / "ok")))
    seconds = time.perf_counter() - started
    err = capsys.readouterr().err
    flag = "--" + option.replace("_", "-")
    assert code == 2 and seconds < 10, (code, seconds, err)
    assert f"{flag}: no such directory '{MISSING}' (relative to {workdir})" in err, err
    assert "could not be looked up as a hub id: offline" in err, err
    assert not (workdir / "out").exists()


@pytest.mark.parametrize("stage, option", [("sft", "model"), ("ppo", "reward_model"), ("eval", "policy_b")])
def test_an_unreachable_hub_is_found_within_seconds(stage, option, workdir, monkeypatch, capsys):
    """HF_HUB_OFFLINE unset, but the hub's host refuses (a closed local port stands in for a
    machine without network): still exit 2 within seconds, the hub named as unreachable."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    started = time.perf_counter()
    code = main(_argv(stage, option, str(workdir / "ok")))
    err = capsys.readouterr().err
    assert code == 2 and time.perf_counter() - started < 10, err
    assert f"no such directory '{MISSING}'" in err and "127.0.0.1 cannot be reached" in err, err


def test_what_can_only_be_a_path_never_asks_the_hub(workdir, monkeypatch, capsys):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(source, "_probe", lambda endpoint: pytest.fail("the hub was asked"))
    assert main(["sft", "--model", "./runs/sft", "--data", "d.jsonl", "--output-dir", "out"]) == 2
    assert "no such directory './runs/sft'" in capsys.readouterr().err


def test_a_reachable_hub_lets_a_hub_id_through(workdir, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(source, "_probe", lambda endpoint: None)
    source.check_model_source("--model", "owner/some-model")  # no error: the hub will be asked
    source.check_model_source("--judge", "world", ("world",))  # a built-in name
