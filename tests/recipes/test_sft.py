"""`tether sft` end to end on tiny models of four architectures and on stories260K."""

import json
import math

import torch

from tether.cli import main
from tether.training.metrics import read_metrics

from conftest import story_rows, write_jsonl


def _plain_eval_loss(model_dir, rows):
    """Response-token NLL computed from outside with plain transformers (no tether code)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    total, count = 0.0, 0
    for r in rows:
        p = tok(r["prompt"])["input_ids"]
        c = tok(r["completion"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids = torch.tensor([p + c])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0, :-1], -1)
        targets = ids[0, 1:]
        scored = logp[torch.arange(len(targets)), targets][len(p) - 1:]
        total -= scored.sum().item()
        count += len(c)
    return total / count


def test_sft_lowers_held_out_loss_on_a_real_model(stories, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", story_rows(96, seed=1))
    held_rows = story_rows(16, seed=2)
    held = write_jsonl(tmp_path / "eval.jsonl", held_rows)
    out = tmp_path / "out"
    before = _plain_eval_loss(stories, held_rows)
    assert main(["sft", "--model", str(stories), "--data", str(train), "--eval-data", str(held),
                 "--output-dir", str(out), "--max-steps", "24", "--lr", "2e-3", "--batch-size", "8",
                 "--no-progress"]) == 0
    after = _plain_eval_loss(out, held_rows)
    rows = read_metrics(out / "metrics.jsonl")
    assert after < 0.6 * before, (before, after)
    assert abs(rows[-1]["eval/loss"] - after) < 1e-3  # tether's eval agrees with the outside one
    assert [r["step"] for r in rows] == list(range(1, 25))
    for key in ("train/loss", "train/lr", "train/grad_norm", "train/tokens_per_sec", "train/epoch"):
        assert key in rows[-1]
    assert (out / "config.yaml").exists() and (out / "tensorboard").is_dir()
    assert (out / "checkpoints" / "step-24" / "trainer_state.json").exists()


def test_sft_runs_on_every_architecture_and_saves_a_plain_hf_dir(tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM

    rows = [{"prompt": "the cat sat on", "completion": " the mat and was happy"}] * 12
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    out = tmp_path / "out"
    assert main(["sft", "--model", str(tiny_model), "--data", str(data), "--output-dir", str(out),
                 "--max-steps", "4", "--batch-size", "4", "--lr", "1e-3", "--eval-fraction", "0",
                 "--no-progress", "--no-tensorboard"]) == 0
    before = AutoModelForCausalLM.from_pretrained(tiny_model)
    after = AutoModelForCausalLM.from_pretrained(out)
    assert any(not torch.equal(a, b) for a, b in zip(before.state_dict().values(),
                                                      after.state_dict().values()))
    assert (out / "model.safetensors").exists() and (out / "tokenizer_config.json").exists()
    assert json.loads((out / "tether_run.json").read_text())["complete"] is True


def test_lora_run_saves_merged_weights(stories, story_data, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "lora"
    assert main(["sft", "--model", str(stories), "--data", str(story_data), "--output-dir", str(out),
                 "--max-steps", "3", "--lora-r", "4", "--lr", "1e-2", "--no-progress"]) == 0
    assert not (out / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(out)
    base = AutoModelForCausalLM.from_pretrained(stories)
    changed = [n for (n, a), b in zip(merged.named_parameters(), base.parameters()) if not torch.equal(a, b)]
    assert changed and all("lora" not in n for n in merged.state_dict())


def test_packing_gives_the_same_loss_as_unpacked(stories):
    from transformers import AutoModelForCausalLM

    from tether.data.sft import collate, collate_packed, pack, tokenize_prompt_completion
    from tether.losses.sft import sft_loss
    from tether.models.load import load_tokenizer

    tok = load_tokenizer(str(stories))
    model = AutoModelForCausalLM.from_pretrained(stories, attn_implementation="sdpa").eval()
    examples = [tokenize_prompt_completion(tok, r["prompt"], r["completion"]) for r in story_rows(6)]
    with torch.no_grad():
        plain = collate(examples, tok.pad_token_id)
        loss_a, _ = sft_loss(model(input_ids=plain["input_ids"], attention_mask=plain["attention_mask"]).logits,
                             plain["labels"], normalizer=1.0)
        bins = pack(examples, max_length=64)
        assert len(bins) < len(examples)  # something really was packed together
        packed = collate_packed(bins, tok.pad_token_id)
        logits = model(input_ids=packed["input_ids"], attention_mask=packed["attention_mask"],
                       position_ids=packed["position_ids"]).logits
        loss_b, _ = sft_loss(logits, packed["labels"], normalizer=1.0)
    assert math.isclose(loss_a.item(), loss_b.item(), rel_tol=1e-4)


def test_packed_sft_run(stories, story_data, tmp_path):
    out = tmp_path / "packed"
    assert main(["sft", "--model", str(stories), "--data", str(story_data), "--output-dir", str(out),
                 "--max-steps", "3", "--packing", "--max-length", "128", "--batch-size", "2",
                 "--no-progress"]) == 0
    assert read_metrics(out / "metrics.jsonl")[-1]["eval/loss"] > 0


def test_refuses_to_overwrite_checkpoints_without_resume(stories, story_data, tmp_path, capsys):
    args = ["sft", "--model", str(stories), "--data", str(story_data), "--output-dir",
            str(tmp_path / "o"), "--max-steps", "1", "--no-progress"]
    assert main(args) == 0
    assert main(args) == 2  # a finished run: replaced only with --overwrite
    err = capsys.readouterr().err
    assert "finished run" in err and "--overwrite" in err


def test_malformed_data_is_reported_by_name_and_line(stories, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": oops}\n')
    assert main(["sft", "--model", str(stories), "--data", str(bad), "--output-dir",
                 str(tmp_path / "o")]) == 1
    assert "bad.jsonl:2: malformed JSON" in capsys.readouterr().err
