"""`tether rm` and `tether score` end to end: K-wise loss and its single forward pass, training
on a real model, plain-transformers loading, calibration, LoRA, exact resume."""

import json
import random
import shutil
from itertools import combinations

import pytest
import torch

from tether.cli import main
from tether.data.preference import collate_groups, tokenize_groups
from tether.errors import TetherError
from tether.losses.reward import pairwise_loss
from tether.models.load import load_tokenizer
from tether.models.reward import (BIAS_KEY, init_reward_model, load_reward_model, scalar_head,
                                  score_texts, sequence_scores)
from tether.recipes.rm import rm_loss_sum
from tether.training.metrics import read_metrics

from conftest import write_jsonl

NAMES = ["Lily", "Tom", "Sue", "Ben", "Max", "Anna", "Sam", "Tim"]
THINGS = ["ball", "cat", "dog", "tree", "cake", "bird", "box", "hat"]


def story_pairs(n, seed=0, gold=False):
    """Chosen: a fluent sentence. Rejected: the same object word repeated."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        name, thing = rng.choice(NAMES), rng.choice(THINGS)
        row = {"prompt": f"Once upon a time, {name} saw a", "chosen": f" {thing}. {name} was very happy.",
               "rejected": f" {thing} {thing} {thing} {thing}."}
        if gold:
            # the labels disagree with gold on every 4th pair, so the two accuracies differ
            flip = len(rows) % 4 == 0
            row.update(gold_chosen=-1.0 if flip else 1.0, gold_rejected=1.0 if flip else -1.0)
        rows.append(row)
    return rows


def story_rankings(n, seed=0):
    """K=3: fluent > half repeated > repeated (responses shuffled, ranks follow them)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        name, thing = rng.choice(NAMES), rng.choice(THINGS)
        responses = [f" {thing}. {name} was very happy.", f" {thing}. {thing} {thing}.",
                     f" {thing} {thing} {thing} {thing}."]
        order = rng.sample(range(3), 3)
        rows.append({"prompt": f"Once upon a time, {name} saw a",
                     "responses": [responses[i] for i in order], "ranks": order})
    return rows


def _rm_args(model, data, out, *extra):
    return ["rm", "--model", str(model), "--data", str(data), "--output-dir", str(out),
            "--no-progress", "--no-tensorboard", *extra]


@pytest.fixture(scope="module")
def trained_rm(stories, tmp_path_factory):
    """One short real run shared by the checks below: stories260K on fluent-vs-repetitive pairs."""
    root = tmp_path_factory.mktemp("rm")
    train = write_jsonl(root / "train.jsonl", story_pairs(160, seed=1))
    held = write_jsonl(root / "eval.jsonl", story_pairs(48, seed=2, gold=True))
    out = root / "out"
    assert main(_rm_args(stories, train, out, "--eval-data", str(held), "--max-steps", "25",
                         "--batch-size", "8", "--lr", "1e-3", "--eval-every", "10")) == 0
    return {"out": out, "train": train, "held": held, "root": root}


# ----------------------------------------------------------------------------- the loss


def _groups(tok, rows):
    return tokenize_groups([{**r, "row": i} for i, r in enumerate(rows)], tok, 64, "truncate", "mem")


def test_kwise_loss_is_the_mean_of_its_pairwise_losses_in_one_forward_pass(tiny_models):
    path = tiny_models["llama"]
    tok = load_tokenizer(str(path))
    model = init_reward_model(str(path), pad_token_id=tok.pad_token_id, seed=3).eval()
    model.config.pad_token_id = tok.pad_token_id
    responses = [" the cat sat", " a dog ran to the park", " no", " the big red ball"]
    ranks = [2, 0, 3, 1]
    groups = _groups(tok, [{"prompt": "once upon a time", "responses": responses, "ranks": ranks},
                           {"prompt": "the girl", "responses": [" yes", " it was sad"], "ranks": [1, 0]}])
    calls = []
    hook = model.register_forward_hook(lambda mod, args, kw, out: calls.append(kw["input_ids"].shape),
                                       with_kwargs=True)
    with torch.no_grad():
        loss_sum, stats = rm_loss_sum(model, collate_groups(groups, tok.pad_token_id))
    hook.remove()
    assert calls == [torch.Size([6, calls[0][1]])]  # ONE forward over all 4 + 2 sequences

    # the same scores, one sequence at a time, then C(4,2) = 6 pairwise losses by hand
    def score(seq):
        ids = torch.tensor([seq])
        return sequence_scores(model, ids, torch.ones_like(ids))[0]

    with torch.no_grad():
        s = [score(seq) for seq in groups[0].sequences]
        t = [score(seq) for seq in groups[1].sequences]
    pairs = [(i, j) if ranks[i] < ranks[j] else (j, i) for i, j in combinations(range(4), 2)]
    assert len(pairs) == 6
    first, _ = pairwise_loss(torch.stack([s[i] for i, _ in pairs]), torch.stack([s[j] for _, j in pairs]))
    second, _ = pairwise_loss(t[1].reshape(1), t[0].reshape(1))
    # each prompt counts once: the sum over groups of their own mean pair loss
    torch.testing.assert_close(loss_sum, first + second, rtol=1e-5, atol=1e-6)
    correct = sum(float(s[i] > s[j]) for i, j in pairs) / 6 + float(t[1] > t[0])
    torch.testing.assert_close(stats["accuracy"], torch.tensor(correct))


def test_margin_is_subtracted_inside_the_sigmoid(tiny_models):
    path = tiny_models["gpt2"]
    tok = load_tokenizer(str(path))
    model = init_reward_model(str(path), pad_token_id=tok.pad_token_id).eval()
    model.config.pad_token_id = tok.pad_token_id
    groups = _groups(tok, [{"prompt": "the cat", "responses": [" sat", " ran to the park"],
                            "ranks": [1, 0], "margin": 2.0}])
    with torch.no_grad():
        loss, _ = rm_loss_sum(model, collate_groups(groups, tok.pad_token_id, with_margin=True))
        scores = [sequence_scores(model, torch.tensor([q]), torch.ones(1, len(q), dtype=torch.long))
                  for q in groups[0].sequences]
    expected = -torch.nn.functional.logsigmoid(scores[1] - scores[0] - 2.0)[0]
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- a real run


def test_rm_learns_on_a_real_model_and_reports_accuracy(trained_rm):
    out = trained_rm["out"]
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 26))
    evals = [r for r in rows if "eval/accuracy" in r]
    assert [r["step"] for r in evals] == [10, 20, 25]
    assert evals[-1]["eval/accuracy"] >= 0.95
    # gold contradicts the labels on every 4th held-out pair (12 of 48): a model that orders
    # the labelled pairs right is right by gold on 36 of 48
    acc, acc_gold = evals[-1]["eval/accuracy"], evals[-1]["eval/accuracy_gold"]
    assert abs(acc_gold - 0.75) <= 1 - acc + 1e-9
    assert evals[-1]["eval/loss"] < rows[0]["train/loss"]
    for key in ("train/loss", "train/accuracy", "train/score_gap", "train/lr", "train/grad_norm"):
        assert key in rows[-1]
    run = json.loads((out / "tether_run.json").read_text())
    assert run["complete"] and run["stage"] == "rm" and run["eval/accuracy"] == evals[-1]["eval/accuracy"]


def test_calibrated_mean_on_the_calibration_set_is_zero(trained_rm):
    out = trained_rm["out"]
    model = load_reward_model(str(out))
    tok = load_tokenizer(str(out))
    rows = [json.loads(line) for line in trained_rm["train"].read_text().splitlines()]
    calibrated = score_texts(model, tok, [r["prompt"] for r in rows], [r["chosen"] for r in rows])
    raw = score_texts(model, tok, [r["prompt"] for r in rows], [r["chosen"] for r in rows],
                      calibrated=False)
    assert abs(sum(calibrated) / len(calibrated)) < 1e-4
    assert abs(sum(raw) / len(raw)) > 0.1  # the bias really did something
    config = json.loads((out / "config.json").read_text())
    assert config[BIAS_KEY] == pytest.approx(-sum(raw) / len(raw), abs=1e-4)
    assert config["tether_reward_std"] > 0 and config["pad_token_id"] == tok.pad_token_id


def _plain_vs_tether(out):
    """Scores of plain transformers (no tether code) vs tether's scorer on the same texts."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    texts = [("Once upon a time, Tom saw a", " cat. Tom was very happy."),
             ("the cat", " sat on the mat"), ("a", " b")]
    plain_tok = AutoTokenizer.from_pretrained(out)
    plain = AutoModelForSequenceClassification.from_pretrained(out, num_labels=1).eval()
    seqs = [plain_tok(p)["input_ids"] + plain_tok(r, add_special_tokens=False)["input_ids"]
            for p, r in texts]
    width = max(map(len, seqs))
    ids = torch.tensor([s + [plain.config.pad_token_id] * (width - len(s)) for s in seqs])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
    with torch.no_grad():
        plain_scores = plain(input_ids=ids, attention_mask=mask).logits[:, 0].tolist()
    tok = load_tokenizer(str(out))
    ours = score_texts(load_reward_model(str(out)), tok, [p for p, _ in texts], [r for _, r in texts],
                       batch_size=2, calibrated=False)
    return plain_scores, ours


def test_output_loads_in_plain_transformers_with_the_same_scores_stories(trained_rm):
    plain, ours = _plain_vs_tether(trained_rm["out"])
    assert ours == pytest.approx(plain, abs=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_output_loads_in_plain_transformers_with_the_same_scores(tiny_models, tmp_path, arch):
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "the cat", "chosen": " sat on the mat",
                                               "rejected": " ran ran ran"}] * 8)
    out = tmp_path / "out"
    assert main(_rm_args(tiny_models[arch], data, out, "--max-steps", "2", "--batch-size", "4",
                         "--lr", "1e-2", "--eval-fraction", "0")) == 0
    plain, ours = _plain_vs_tether(out)
    assert ours == pytest.approx(plain, abs=1e-5)
    assert len(set(round(s, 4) for s in ours)) > 1  # not a constant head


def test_lora_rm_saves_merged_weights_with_the_trained_head(stories, tmp_path):
    from transformers import AutoModelForSequenceClassification

    data = write_jsonl(tmp_path / "d.jsonl", story_pairs(32))
    out = tmp_path / "lora"
    assert main(_rm_args(stories, data, out, "--max-steps", "3", "--batch-size", "4", "--lr", "1e-2",
                         "--lora-r", "4", "--eval-fraction", "0")) == 0
    assert not (out / "adapter_config.json").exists()
    merged = AutoModelForSequenceClassification.from_pretrained(out, num_labels=1)
    fresh = init_reward_model(str(stories), seed=0)  # the head the run started from
    assert all("lora" not in n and "modules_to_save" not in n for n in merged.state_dict())
    assert not torch.equal(merged.score.weight, fresh.score.weight)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(merged.state_dict()[q], fresh.state_dict()[q])


def test_kwise_rm_resume_reproduces_the_uninterrupted_losses(stories, tmp_path):
    data = write_jsonl(tmp_path / "rank.jsonl", story_rankings(40))
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    common = ("--max-steps", "8", "--batch-size", "4", "--lr", "1e-3", "--eval-fraction", "0.1")
    assert main(_rm_args(stories, data, full, *common, "--save-every", "4")) == 0
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "step-4", resumed / "checkpoints" / "step-4")
    assert main(_rm_args(stories, data, resumed, *common, "--resume")) == 0
    a = {r["step"]: r["train/loss"] for r in read_metrics(full / "metrics.jsonl")}
    b = {r["step"]: r["train/loss"] for r in read_metrics(resumed / "metrics.jsonl")}
    assert sorted(b) == [5, 6, 7, 8]
    for step in b:
        assert b[step] == pytest.approx(a[step], rel=1e-6, abs=1e-7), step
    final = read_metrics(full / "metrics.jsonl")[-1]
    assert 0 <= final["eval/accuracy"] <= 1 and "eval/accuracy_gold" not in final


def test_use_margin_without_a_margin_column_is_an_error(tiny_models, tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "chosen": " b", "rejected": " c"}] * 4)
    assert main(_rm_args(tiny_models["llama"], data, tmp_path / "o", "--use-margin")) == 1
    assert "--use-margin needs pairs with a numeric 'margin' column" in capsys.readouterr().err


# ----------------------------------------------------------------------------- tether score


def test_score_writes_pairs_and_single_responses(trained_rm):
    root, rm = trained_rm["root"], trained_rm["out"]
    bias = json.loads((rm / "config.json").read_text())[BIAS_KEY]
    pairs_out = root / "pair_scores.jsonl"
    assert main(["score", "--reward-model", str(rm), "--data", str(trained_rm["held"]),
                 "--output", str(pairs_out), "--batch-size", "5"]) == 0
    rows = [json.loads(line) for line in pairs_out.read_text().splitlines()]
    assert len(rows) == 48 and [r["row"] for r in rows] == list(range(48))
    for r in rows:
        assert r["score_margin"] == pytest.approx(r["raw_score_chosen"] - r["raw_score_rejected"])
        assert r["score_chosen"] == pytest.approx(r["raw_score_chosen"] + bias)
        assert r["prompt"].startswith("Once upon a time")  # the input row is kept
    # scoring the held-out set reproduces the run's own eval/accuracy
    accuracy = json.loads((rm / "tether_run.json").read_text())["eval/accuracy"]
    assert sum(r["score_margin"] > 0 for r in rows) / len(rows) == pytest.approx(accuracy)

    singles = write_jsonl(root / "singles.jsonl", [{"prompt": "Once upon a time, Tom saw a",
                                                   "response": " cat. Tom was very happy."},
                                                  {"prompt": "Once upon a time, Tom saw a",
                                                   "response": " cat cat cat cat."}])
    out_dir = root / "score_run"
    assert main(["score", "--reward-model", str(rm), "--data", str(singles),
                 "--output-dir", str(out_dir)]) == 0
    scored = [json.loads(line) for line in (out_dir / "scores.jsonl").read_text().splitlines()]
    assert [sorted(r) for r in scored] == [["prompt", "raw_score", "response", "row", "score"]] * 2
    assert scored[0]["score"] > scored[1]["score"]
    assert json.loads((out_dir / "tether_run.json").read_text())["complete"]


def test_score_requires_an_output(capsys):
    assert main(["score", "--reward-model", "x", "--data", "y"]) == 2
    assert "--output is required" in capsys.readouterr().err


def test_conversational_preferences_train_rm_and_dpo_and_score(tiny_models, tmp_path):
    """Chat-model preference data (role/content messages, UltraFeedback style) through the chat
    template: the RM learns it, `tether score` reads it, DPO trains on it."""
    rng = random.Random(0)
    rows = []
    for _ in range(24):
        thing = rng.choice(THINGS)
        question = [{"role": "user", "content": f"what is a {thing}"}]
        rows.append({"prompt": f"what is a {thing}",
                     "chosen": question + [{"role": "assistant", "content": f"a {thing} is nice"}],
                     "rejected": question + [{"role": "assistant", "content": f"{thing} {thing} {thing}"}]})
    data = write_jsonl(tmp_path / "chat.jsonl", rows)
    model, out = tiny_models["qwen2"], tmp_path / "rm"
    assert main(_rm_args(model, data, out, "--max-steps", "12", "--batch-size", "8", "--lr", "3e-3",
                         "--eval-fraction", "0.25")) == 0
    run = json.loads((out / "tether_run.json").read_text())
    assert run["eval/accuracy"] >= 0.8
    scores = tmp_path / "scores.jsonl"
    assert main(["score", "--reward-model", str(out), "--data", str(data), "--output", str(scores)]) == 0
    scored = [json.loads(line) for line in scores.read_text().splitlines()]
    assert len(scored) == 24
    assert sum(r["score_chosen"] > r["score_rejected"] for r in scored) >= 20
    assert main(["dpo", "--model", str(model), "--data", str(data), "--output-dir", str(tmp_path / "dpo"),
                 "--max-steps", "2", "--batch-size", "4", "--kl-samples", "2", "--kl-response-length", "4",
                 "--no-progress", "--no-tensorboard"]) == 0


def test_a_causal_lm_is_refused_where_a_trained_reward_model_is_needed(tiny_models, tmp_path, capsys):
    """transformers would load a causal LM as a SequenceClassification model with a random head,
    and PPO would optimise noise: `load_reward_model` (behind PPO, best-of-N, scoring and eval)
    refuses it and says what to do."""
    lm = tiny_models["llama"]
    with pytest.raises(TetherError, match=r"not a trained reward model.*score\.weight missing.*tether rm"):
        load_reward_model(str(lm))
    assert scalar_head(init_reward_model(str(lm))).weight.abs().sum() > 0  # `tether rm` starts one
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "the cat sat"}] * 4)
    assert main(["ppo", "--policy", str(lm), "--reward-model", str(lm), "--prompts", str(prompts),
                 "--output-dir", str(tmp_path / "out"), "--max-steps", "1", "--batch-size", "4",
                 "--no-progress", "--no-tensorboard"]) != 0
    assert "not a trained reward model" in capsys.readouterr().err
    assert not (tmp_path / "out" / "model.safetensors").exists()
