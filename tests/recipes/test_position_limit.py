"""Inputs longer than a learned position table get a clear error before any work, not an
IndexError from inside the model's forward."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from tether.cli import main
from tether.models.load import position_limit

from conftest import write_jsonl


def _model(family: str, positions: int):
    key = "n_positions" if family in ("gpt2", "gpt_bigcode") else "max_position_embeddings"
    sizes = {"gpt2": dict(n_embd=32, n_layer=1, n_head=4), "gpt_bigcode": dict(n_embd=32, n_layer=1, n_head=4),
             "opt": dict(hidden_size=32, ffn_dim=64, num_hidden_layers=1, num_attention_heads=4,
                         word_embed_proj_dim=32),
             "gpt_neo": dict(hidden_size=32, num_layers=2, num_heads=4, attention_types=[[["global", "local"], 1]]),
             "llama": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4),
             "gpt_neox": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)}
    config = AutoConfig.for_model(family, vocab_size=64, **{key: positions}, **sizes[family])
    return AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize("family, key", [("gpt2", "n_positions"), ("gpt_bigcode", "n_positions"),
                                         ("opt", "max_position_embeddings"),
                                         ("gpt_neo", "max_position_embeddings")])
def test_learned_position_tables_are_found(family, key):
    model = _model(family, 48)
    assert position_limit(model) == (48, key)
    ids = torch.zeros((1, 49), dtype=torch.long)
    with pytest.raises(IndexError):  # what the check spares the user
        model(input_ids=ids)


@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
def test_computed_positions_have_no_limit(family):
    model = _model(family, 48)
    assert position_limit(model) is None
    model(input_ids=torch.zeros((1, 60), dtype=torch.long))  # longer than stated, and it runs


@pytest.fixture
def short_gpt2(tiny_models, tmp_path):
    """The tiny GPT-2 of the suite, with a position table of 24 rows."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["gpt2"])
    config = AutoConfig.from_pretrained(tiny_models["gpt2"])
    config.n_positions = 24
    torch.manual_seed(0)
    path = tmp_path / "short_gpt2"
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path, tokenizer


def test_sft_refuses_examples_longer_than_the_position_table(short_gpt2, tmp_path, capsys):
    path, tokenizer = short_gpt2
    rows = [{"prompt": "the cat sat on the mat and", "completion": " the dog sat on the rug and the bird sat"
             " on the tree and the fish sat in the pond"}] * 8
    longest = len(tokenizer(rows[0]["prompt"] + rows[0]["completion"])["input_ids"])
    assert longest > 24
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    args = ["sft", "--model", str(path), "--data", str(data), "--max-steps", "1", "--batch-size", "4",
            "--no-progress", "--eval-fraction", "0"]
    # a length the user chose, and the examples reach past the table: refused, before any work
    assert main(args + ["--output-dir", str(tmp_path / "a"), "--max-length", "100"]) != 0
    err = capsys.readouterr().err
    assert "24 positions" in err and "n_positions" in err and "--max-length" in err, err
    assert "IndexError" not in err
    assert not (tmp_path / "a" / "model.safetensors").exists()
    # the fix it names works
    assert main(args + ["--output-dir", str(tmp_path / "b"), "--max-length", "24"]) == 0
    # the default --max-length (512) is lowered to the table, with a warning
    assert main(args + ["--output-dir", str(tmp_path / "c")]) == 0


def test_grpo_refuses_prompt_plus_response_longer_than_the_position_table(short_gpt2, tmp_path, capsys):
    path, _ = short_gpt2
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "the cat sat on the mat"}] * 8)
    reward = tmp_path / "r.py"
    reward.write_text("def score(prompts, completions, **_):\n    return [len(c) / 10 for c in completions]\n")
    args = ["grpo", "--policy", str(path), "--prompts", str(prompts), "--reward-fn", f"{reward}:score",
            "--num-generations", "2", "--batch-size", "2", "--max-steps", "1", "--no-progress"]
    # the response alone does not fit: refused, naming --response-length
    assert main(args + ["--output-dir", str(tmp_path / "a"), "--response-length", "30"]) != 0
    err = capsys.readouterr().err
    assert "24 positions" in err and "--response-length" in err, err
    assert main(args + ["--output-dir", str(tmp_path / "b"), "--response-length", "8"]) == 0


def test_grpo_cuts_long_prompts_to_the_table_when_the_prompt_length_is_left_at_its_default(
        short_gpt2, tmp_path, capsys):
    path, tokenizer = short_gpt2
    text = "the cat sat on the mat and the dog sat on the rug and the bird sat on the tree"
    assert len(tokenizer(text)["input_ids"]) + 8 > 24
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": text}] * 8)
    reward = tmp_path / "r.py"
    reward.write_text("def score(prompts, completions, **_):\n    return [len(c) / 10 for c in completions]\n")
    args = ["grpo", "--policy", str(path), "--prompts", str(prompts), "--reward-fn", f"{reward}:score",
            "--num-generations", "2", "--batch-size", "2", "--max-steps", "1", "--no-progress",
            "--response-length", "8"]
    # the default --max-prompt-length (256) becomes 24 - 8 = 16: the prompts lose their beginnings
    assert main(args + ["--output-dir", str(tmp_path / "a")]) == 0
    # a --max-prompt-length the user chose is kept, and refused when the prompts reach past the table
    assert main(args + ["--output-dir", str(tmp_path / "b"), "--max-prompt-length", "100"]) != 0
    assert "--max-prompt-length (now 100" in capsys.readouterr().err


@pytest.mark.parametrize("stage", ["rm", "dpo"])
def test_preference_stages_refuse_pairs_longer_than_the_position_table(stage, short_gpt2, tmp_path, capsys):
    path, _ = short_gpt2
    long_tail = " and the dog sat on the rug and the bird sat on the tree and the fish sat in the pond"
    rows = [{"prompt": "the cat sat on the mat", "chosen": " yes" + long_tail, "rejected": " no" + long_tail}] * 8
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    args = [stage, "--model", str(path), "--data", str(data), "--max-steps", "1", "--batch-size", "4",
            "--no-progress", "--eval-fraction", "0"]
    assert main(args + ["--output-dir", str(tmp_path / "a"), "--max-length", "100"]) != 0
    err = capsys.readouterr().err
    assert "24 positions" in err and "--max-length" in err, err
    assert not (tmp_path / "a" / "model.safetensors").exists()
    assert main(args + ["--output-dir", str(tmp_path / "b")]) == 0  # the default fits itself
    if stage == "rm":  # scoring with it cuts rows to its table, as its training data were cut
        scores = tmp_path / "scores.jsonl"
        assert main(["score", "--reward-model", str(tmp_path / "b"), "--data", str(data),
                     "--output", str(scores)]) == 0
        assert len(scores.read_text().splitlines()) == len(rows)
        prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": rows[0]["prompt"] + long_tail}] * 2)
        assert main(["bon", "--policy", str(path), "--reward-model", str(tmp_path / "b"), "--prompts",
                     str(prompts), "--n", "2", "--response-length", "8", "--output-dir", str(tmp_path / "bon"),
                     "--no-progress"]) == 0


def test_sampling_cuts_prompts_to_the_table_and_refuses_responses_that_cannot_fit(short_gpt2):
    from tether.errors import ConfigError
    from tether.eval.sampling import sample_responses

    path, tokenizer = short_gpt2
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    prompt = "the cat sat on the mat and the dog sat on the rug and the bird sat on the tree"
    assert len(tokenizer(prompt)["input_ids"]) + 8 > 24
    # best-of-N, evaluation and DPO's KL samples: the prompt keeps its last 24 - 8 tokens
    samples = sample_responses(model, tokenizer, [prompt], n=2, max_new_tokens=8)
    assert len(samples.responses) == 2
    with pytest.raises(ConfigError, match="24 positions"):
        sample_responses(model, tokenizer, [prompt], max_new_tokens=24)


def test_ppo_refuses_ptx_rows_longer_than_the_position_table(short_gpt2, tmp_path, capsys):
    path, _ = short_gpt2
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "the cat sat on the mat"}] * 8)
    long_text = "the dog sat on the rug and the bird sat on the tree and the fish sat in the pond " * 2
    ptx = write_jsonl(tmp_path / "ptx.jsonl", [{"text": long_text}] * 4)
    reward = tmp_path / "r.py"
    reward.write_text("def score(prompts, completions, **_):\n    return [len(c) / 10 for c in completions]\n")
    assert main(["ppo", "--policy", str(path), "--prompts", str(prompts), "--reward-fn", f"{reward}:score",
                 "--batch-size", "2", "--max-steps", "1", "--no-progress", "--response-length", "8",
                 "--max-prompt-length", "100", "--ptx-data", str(ptx), "--critic", "head",
                 "--output-dir", str(tmp_path / "a")]) != 0
    err = capsys.readouterr().err
    assert "--ptx-data" in err and "24 positions" in err, err


def test_the_table_is_read_from_the_config_and_a_meta_build_only_when_it_may_be_too_short(
        short_gpt2, tiny_models, monkeypatch):
    from transformers import AutoModelForCausalLM as Auto

    from tether.models.load import declared_position_limit

    path, _ = short_gpt2
    builds = []
    real = Auto.from_config.__func__

    def counted(cls, config, **kwargs):
        builds.append(config.model_type)
        return real(cls, config, **kwargs)

    monkeypatch.setattr(Auto, "from_config", classmethod(counted))
    assert declared_position_limit(str(path)) == (24, "n_positions")  # no length given: built
    assert declared_position_limit(str(path), longest=24) is None  # 24 fit the 24 stated
    assert declared_position_limit(str(path), longest=25) == (24, "n_positions")
    assert declared_position_limit(tiny_models["llama"], longest=10**6) is None  # rotary: no table
    assert builds == ["gpt2", "gpt2", "llama"]
