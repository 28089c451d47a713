"""`tether dpo`: the policy moves towards chosen responses and away from rejected ones."""

import torch

from tether.cli import main
from tether.training.metrics import read_metrics

from conftest import write_jsonl


def _logp(model_dir, prompt, response):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    p = tok(prompt)["input_ids"]
    r = tok(response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    ids = torch.tensor([p + r])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0, :-1], -1)
    return logp[torch.arange(len(p) - 1, ids.shape[1] - 1), ids[0, len(p):]].sum().item()


def test_dpo_prefers_chosen_and_reports_margins_and_kl(stories, tmp_path):
    rows = [{"prompt": f"Once upon a time, {n} saw a", "chosen": f" cat. {n} liked the cat.",
             "rejected": " cat cat cat cat cat."} for n in ["Tom", "Lily", "Sue", "Ben"] * 8]
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    out = tmp_path / "dpo"
    assert main(["dpo", "--model", str(stories), "--data", str(data), "--output-dir", str(out),
                 "--max-steps", "6", "--lr", "1e-3", "--batch-size", "8", "--kl-samples", "4",
                 "--kl-response-length", "16", "--no-progress", "--no-tensorboard"]) == 0
    prompt, good, bad = "Once upon a time, Max saw a", " cat. Max liked the cat.", " cat cat cat cat cat."
    before = _logp(stories, prompt, good) - _logp(stories, prompt, bad)
    after = _logp(out, prompt, good) - _logp(out, prompt, bad)
    assert after > before + 1.0  # the implicit reward margin grew on an unseen name
    last = read_metrics(out / "metrics.jsonl")[-1]
    assert last["train/margin"] > 0 and last["eval/accuracy"] == 1.0
    import json

    summary = json.loads((out / "tether_run.json").read_text())
    assert summary["eval/kl_ref"] > 0


def test_dpo_reads_kwise_rankings(stories, tmp_path):
    rows = [{"prompt": "Once upon a time, Tom saw a", "responses": [" cat.", " dog dog dog.", " tree."],
             "ranks": [0, 2, 1]}] * 6
    data = write_jsonl(tmp_path / "ranked.jsonl", rows)
    out = tmp_path / "dpo_k"
    assert main(["dpo", "--model", str(stories), "--data", str(data), "--output-dir", str(out),
                 "--max-steps", "2", "--batch-size", "6", "--kl-samples", "0", "--eval-fraction", "0",
                 "--no-progress", "--no-tensorboard"]) == 0
    assert (out / "model.safetensors").exists()
