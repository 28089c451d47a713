"""`tether dpo --loss ...` and `tether kto` on tiny random models of several families: every loss
moves the policy towards the preferred responses, measured from outside with plain
transformers on a prompt it never saw; the reference-free losses never load a reference; KTO
reads TRL's unpaired rows (plain and conversational) and preference files as unpaired; bad
input is refused naming the row."""

import json

import pytest
import torch

from tether.cli import main

from conftest import write_jsonl

NAMES = ["Tom", "Lily", "Sue", "Ben"]
GOOD, BAD = " a red ball. {n} liked it.", " cat cat cat cat cat."


@pytest.fixture(autouse=True, scope="module")
def one_thread(one_torch_thread):
    """Tiny models run faster on one thread (see conftest)."""


def _pairs(tmp_path):
    return write_jsonl(tmp_path / "pairs.jsonl", [
        {"prompt": f"Once upon a time, {n} saw", "chosen": GOOD.format(n=n), "rejected": BAD}
        for n in NAMES * 4])


def _margin(model_dir, name="Max"):
    """log p(good) - log p(bad) (responses with their EOS) on an unseen name, from outside."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    prompt = tok(f"Once upon a time, {name} saw")["input_ids"]

    def logp(response):
        r = tok(response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids = torch.tensor([prompt + r])
        with torch.no_grad():
            lp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
        return lp[torch.arange(len(prompt) - 1, ids.shape[1] - 1), ids[0, len(prompt):]].sum().item()

    return logp(GOOD.format(n=name)) - logp(BAD)


def _dpo(model, data, out, *extra):
    return main(["dpo", "--model", str(model), "--data", str(data), "--output-dir", str(out),
                 "--max-steps", "8", "--lr", "5e-3", "--batch-size", "8", "--kl-samples", "0",
                 "--eval-fraction", "0", "--warmup-ratio", "0", "--no-progress", "--no-tensorboard", *extra])


@pytest.mark.parametrize("arch, extra", [
    ("llama", ("--loss", "sigmoid")),
    ("qwen2", ("--loss", "ipo")),
    ("gpt2", ("--loss", "robust", "--label-smoothing", "0.1")),
    ("neox", ("--loss", "conservative", "--label-smoothing", "0.1")),
    ("llama", ("--loss", "hinge")),
    ("qwen2", ("--loss", "simpo")),
    ("gpt2", ("--loss", "orpo")),
])
def test_every_loss_prefers_the_chosen_response_from_outside(arch, extra, tiny_models, tmp_path):
    model, out = tiny_models[arch], tmp_path / "run"
    assert _dpo(model, _pairs(tmp_path), out, *extra) == 0
    assert _margin(out) > _margin(model) + 1.0, extra
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["train/accuracy"] > 0.5


@pytest.mark.parametrize("loss, loads", [("simpo", 1), ("orpo", 1), ("sigmoid", 2)])
def test_reference_free_losses_load_no_reference(loss, loads, tiny_models, tmp_path, monkeypatch):
    """The policy is the only model loaded and no reference log-probabilities are computed; a
    reference-based loss (with its KL samples) loads the reference after training, so the
    count can tell them apart."""
    import tether.recipes.dpo as dpo
    from tether.config import DPOConfig, from_dict

    loaded, filled = [], []
    real_load, real_fill = dpo.load_causal_lm, dpo.fill_reference_logps
    monkeypatch.setattr(dpo, "load_causal_lm", lambda *a, **k: loaded.append(a[0]) or real_load(*a, **k))
    monkeypatch.setattr(dpo, "fill_reference_logps", lambda *a, **k: filled.append(1) or real_fill(*a, **k))
    cfg = from_dict(DPOConfig, {"model": str(tiny_models["llama"]), "data": str(_pairs(tmp_path)),
                                "output_dir": str(tmp_path / "run"), "max_steps": 1, "batch_size": 8,
                                "loss": loss, "kl_samples": 2, "kl_response_length": 4,
                                "progress": False, "tensorboard": False})
    summary = dpo.run(cfg)
    assert len(loaded) == loads and bool(filled) == (loss == "sigmoid")
    assert ("eval/kl_ref" in summary) == (loss == "sigmoid")


def _kto(model, data, out, *extra):
    return main(["kto", "--model", str(model), "--data", str(data), "--output-dir", str(out),
                 "--max-steps", "10", "--lr", "5e-3", "--batch-size", "8", "--kl-samples", "2",
                 "--kl-response-length", "4", "--eval-fraction", "0", "--warmup-ratio", "0",
                 "--no-progress", "--no-tensorboard", *extra])


@pytest.mark.parametrize("arch", ["llama", "neox"])
def test_kto_on_unpaired_labels_moves_towards_the_desirable(arch, tiny_models, tmp_path):
    rows = [{"prompt": f"Once upon a time, {n} saw", "completion": GOOD.format(n=n), "label": True}
            for n in NAMES * 3] + [{"prompt": f"Once upon a time, {n} saw", "completion": BAD, "label": False}
                                   for n in NAMES * 3]
    model, out = tiny_models[arch], tmp_path / "run"
    assert _kto(model, write_jsonl(tmp_path / "kto.jsonl", rows), out) == 0
    assert _margin(out) > _margin(model) + 1.0
    summary = json.loads((out / "tether_run.json").read_text())
    assert summary["eval/kl_ref"] > 0 if "eval/kl_ref" in summary else True
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"train/loss", "train/z0", "train/reward_desirable", "train/reward_undesirable"} <= set(metrics[-1])
    assert metrics[-1]["train/reward_desirable"] > metrics[-1]["train/reward_undesirable"]


def test_kto_reads_a_pairs_file_as_unpaired(tiny_models, tmp_path):
    model, out = tiny_models["qwen2"], tmp_path / "run"
    assert _kto(model, _pairs(tmp_path), out) == 0
    assert _margin(out) > _margin(model) + 1.0


def test_kto_reads_conversational_rows(tiny_models, tmp_path):
    """TRL's conversational unpaired rows, rendered with the qwen2 fixture's ChatML template."""
    rows = [{"prompt": [{"role": "user", "content": f"Tell me about {n}"}],
             "completion": [{"role": "assistant", "content": GOOD.format(n=n)}], "label": True}
            for n in NAMES] + [{"prompt": [{"role": "user", "content": f"Tell me about {n}"}],
                                "completion": [{"role": "assistant", "content": BAD}], "label": False}
                               for n in NAMES]
    assert _kto(tiny_models["qwen2"], write_jsonl(tmp_path / "chat.jsonl", rows), tmp_path / "run",
                "--max-steps", "1") == 0


def test_kto_refuses_a_label_that_is_not_a_boolean(tiny_models, tmp_path, capsys):
    rows = [{"prompt": "a", "completion": " b", "label": "yes"}, {"prompt": "a", "completion": " c", "label": "no"}]
    data = write_jsonl(tmp_path / "bad.jsonl", rows)
    assert _kto(tiny_models["llama"], data, tmp_path / "run") == 1  # a DataError
    err = capsys.readouterr().err
    assert "bad.jsonl:1: 'label' must be true" in err and not (tmp_path / "run" / "model.safetensors").exists()
