"""Conversational prompts (TRL's `prompt` of role/content messages, or `messages`) in the stages
that sample or label outside the online loop: bon, eval, judge and iterate (the labeling page's
tests are in test_label.py). The policy, the reward model and the LM judge are the tiny ChatML
Qwen2 (conftest.chat_model), so every check can tell a conversation rendered in the template
(<|im_start|>user ...) from its plain text, and every output must keep the messages."""

import json

import pytest
import torch

from conftest import write_jsonl
from tether.cli import main
from tether.config import JudgeConfig, load_config
from tether.data.io import load_rows
from tether.data.preference import read_preference_rows
from tether.errors import DataError
from tether.feedback.items import read_items
from tether.feedback.labels import LabelFile
from tether.models.load import load_tokenizer

QUESTIONS = ["what is a cat", "why did the dog run", "is the sun big", "how is the red ball"]
N = 3


def user(text):
    return [{"role": "user", "content": text}]


def chatml(question):
    """The ChatML rendering of one user turn with the generation prompt."""
    return f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def bon_run(chat_model, chat_reward_model, tmp_path_factory):
    """tether bon on chat rows; also every text the reward model read, decoded."""
    from tether.models import reward

    root = tmp_path_factory.mktemp("bon_chat")
    prompts = write_jsonl(root / "prompts.jsonl", [{"prompt": user(q)} for q in QUESTIONS])
    tok = load_tokenizer(str(chat_reward_model))
    seen, score_sequences = [], reward.score_sequences

    def spy(model, seqs, *args, **kwargs):
        seen.extend(tok.decode(s) for s in seqs)
        return score_sequences(model, seqs, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(reward, "score_sequences", spy)
        assert main(["bon", "--policy", str(chat_model), "--reward-model", str(chat_reward_model),
                     "--prompts", str(prompts), "--output-dir", str(root / "bon"), "--n", str(N),
                     "--response-length", "6", "--temperature", "1.5", "--batch-size", "5",
                     "--no-progress"]) == 0
    return root, prompts, seen


def test_bon_scores_the_rendered_conversation_and_keeps_the_messages(bon_run, chat_reward_model):
    from transformers import AutoModelForSequenceClassification

    root, _, seen = bon_run
    rows = read_jsonl(root / "bon" / "bon.jsonl")
    assert [r["prompt"] for r in rows] == [user(q) for q in QUESTIONS]
    # the RM read each sample as the ChatML conversation, and nothing else
    assert len(seen) == N * len(QUESTIONS)
    assert all(any(text.startswith(chatml(q)) for q in QUESTIONS) for text in seen)
    # the scores are the RM's on the rendered prompt + the response, recomputed outside tether
    tok = load_tokenizer(str(chat_reward_model))
    rm = AutoModelForSequenceClassification.from_pretrained(chat_reward_model, num_labels=1).eval()
    for q, row in zip(QUESTIONS, rows):
        assert all(isinstance(r, str) for r in row["responses"]) and len(row["responses"]) == N
        for response, score in zip(row["responses"], row["scores"]):
            ids = tok(chatml(q), add_special_tokens=False)["input_ids"] + \
                tok(response, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                assert rm(torch.tensor([ids])).logits[0, 0].item() == pytest.approx(score, abs=1e-4)
    # tether score reads bon.jsonl's conversations as bon's RM read them
    scored = root / "scored.jsonl"
    assert main(["score", "--reward-model", str(chat_reward_model), "--data", str(root / "bon" / "bon.jsonl"),
                 "--output", str(scored)]) == 0
    assert [r["score"] for r in read_jsonl(scored)] == pytest.approx([r["score"] for r in rows], abs=1e-4)
    pairs = read_jsonl(root / "bon" / "pairs.jsonl")
    assert pairs, "the samples of some prompt should differ"
    best = {json.dumps(r["prompt"]): r["response"] for r in rows}
    for pair in pairs:  # TRL's conversational preference form
        assert pair["prompt"] in [user(q) for q in QUESTIONS]
        assert pair["chosen"] == [{"role": "assistant", "content": best[json.dumps(pair["prompt"])]}]
        assert [m["role"] for m in pair["rejected"]] == ["assistant"]


def test_rm_and_dpo_train_on_the_conversational_pairs_as_they_are(bon_run, chat_model, tmp_path):
    root, _, _ = bon_run
    pairs = root / "bon" / "pairs.jsonl"
    rows = read_preference_rows(load_rows(str(pairs)), str(pairs), tokenizer=load_tokenizer(str(chat_model)))
    assert rows and all(r["chat"] and r["prompt"] in map(chatml, QUESTIONS) for r in rows)
    assert main(["rm", "--model", str(chat_model), "--data", str(pairs), "--output-dir", str(tmp_path / "rm"),
                 "--max-steps", "1", "--batch-size", "2", "--eval-fraction", "0", "--no-progress",
                 "--no-tensorboard"]) == 0
    assert main(["dpo", "--model", str(chat_model), "--data", str(pairs), "--output-dir", str(tmp_path / "dpo"),
                 "--max-steps", "1", "--batch-size", "2", "--eval-fraction", "0", "--kl-samples", "2",
                 "--kl-response-length", "4", "--no-progress", "--no-tensorboard"]) == 0
    assert (tmp_path / "rm" / "model.safetensors").exists() and (tmp_path / "dpo" / "model.safetensors").exists()


def test_eval_on_chat_prompts_judges_the_conversation_and_writes_the_messages(bon_run, chat_model,
                                                                            chat_reward_model, tmp_path,
                                                                            capsys):
    from tether.report.html import _samples

    root, prompts, _ = bon_run
    sbs, out = tmp_path / "sbs.jsonl", tmp_path / "eval" / "chat.json"
    # A: the policy itself, B: best-of-N's answers (a file whose prompts are messages)
    assert main(["eval", "--policy-a", str(chat_model), "--policy-b", str(root / "bon" / "bon.jsonl"),
                 "--prompts", str(prompts), "--judge", str(chat_reward_model), "--reference", str(chat_model),
                 "--output", str(out), "--side-by-side", str(sbs), "--response-length", "5",
                 "--no-progress"]) == 0
    result = json.loads(out.read_text())
    assert result["prompts"] == 4 and result["kl_a_to_reference"] == pytest.approx(0.0, abs=1e-4)
    best = {json.dumps(r["prompt"]): r for r in read_jsonl(root / "bon" / "bon.jsonl")}
    rows = read_jsonl(sbs)
    assert [r["prompt"] for r in rows] == [user(q) for q in QUESTIONS]
    assert result["samples"] == rows
    for row in rows:  # the judge read B's answers as bon's RM did: the same conversation, the same score
        assert row["b"] == best[json.dumps(row["prompt"])]["response"]
        assert row["score_b"] == pytest.approx(best[json.dumps(row["prompt"])]["score"], abs=1e-4)
    assert [it.prompt for it in read_items(str(sbs))] == [user(q) for q in QUESTIONS]
    assert "user: what is a cat" in _samples(out.parent)  # tether report shows the turns
    # the world's gold judge reads only the world's plain prompts
    assert main(["eval", "--policy-a", str(chat_model), "--policy-b", str(root / "bon" / "bon.jsonl"),
                 "--prompts", str(prompts), "--output", str(tmp_path / "w.json"), "--no-progress"]) == 2
    assert "--judge world scores the built-in world's plain string prompts" in capsys.readouterr().err


# ----------------------------------------------------------------------------- tether judge


def judge(*argv):
    return load_config(JudgeConfig, [*argv, "--no-progress", "--dtype", "float32"])


def test_lm_judge_reads_the_conversation_and_the_labels_keep_it(bon_run, chat_model, tmp_path):
    import tether.feedback.judge as judges
    from tether.recipes.judge import run

    root, _, _ = bon_run
    pairs = root / "bon" / "pairs.jsonl"
    tok = load_tokenizer(str(chat_model))
    seen, probabilities = [], judges.answer_probabilities

    def spy(model, seqs, *args, **kwargs):
        seen.extend(tok.decode(s) for s in seqs)
        return probabilities(model, seqs, *args, **kwargs)

    out = tmp_path / "labels.jsonl"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(judges, "answer_probabilities", spy)
        summary = run(judge("--input", str(pairs), "--output", str(out), "--judge", str(chat_model)))
    n = len(read_jsonl(pairs))
    assert summary["judged"] == n and len(seen) == 2 * n  # both orders of every pair
    # {prompt} holds the conversation in the judge's template, up to the assistant's turn
    assert all(any(f"Prompt:\n{chatml(q).strip()}\n\nResponse A:" in text for q in QUESTIONS) for text in seen)
    records = LabelFile(out).read()
    assert len(records) == summary["labels_written"] == n - summary["ties"] > 0
    assert all(r["prompt"] in [user(q) for q in QUESTIONS] for r in records)
    assert all(isinstance(x, str) for r in records for x in r["responses"])
    labelled = read_preference_rows(load_rows(str(out)), str(out), tokenizer=tok)  # as tether rm reads it
    assert all(r["chat"] and r["prompt"] in map(chatml, QUESTIONS) for r in labelled)


def test_rm_judge_agrees_with_best_of_n_and_unsure_conversations_resume(bon_run, chat_reward_model, tmp_path):
    from tether.recipes.judge import run

    root, _, _ = bon_run
    pairs = root / "bon" / "pairs.jsonl"
    args = ["--input", str(pairs), "--reward-model", str(chat_reward_model)]
    # the same RM reading the same conversations ranks bon's chosen (its best) first every time
    summary = run(judge(*args, "--output", str(tmp_path / "rm.jsonl")))
    assert summary["labels_written"] == len(read_jsonl(pairs))
    assert summary["agreement_with_input"]["agreement"] == 1.0
    # everything left for people (no confidence reaches 1), then a rerun finds it all done
    first = run(judge(*args, "--output", str(tmp_path / "o.jsonl"), "--min-confidence", "1"))
    unsure = read_jsonl(tmp_path / "o.unsure.jsonl")
    assert first["left_for_people"] == len(unsure) == len(read_jsonl(pairs))
    assert all(row["prompt"] in [user(q) for q in QUESTIONS] for row in unsure)
    again = run(judge(*args, "--output", str(tmp_path / "o.jsonl"), "--min-confidence", "1"))
    assert again["already_judged"] == len(unsure) and again["judged"] == 0


FUNCTION = '''
def longest(prompts, completions):
    """The longer assistant message wins; only TRL's conversational form is accepted."""
    assert all(isinstance(p, list) and p[-1]["role"] == "user" for p in prompts), prompts
    assert all(c[0]["role"] == "assistant" for c in completions), completions
    return [float(len(c[0]["content"])) for c in completions]
'''


def test_function_judge_gets_trls_conversational_form(bon_run, tmp_path):
    from tether.recipes.judge import run

    root, _, _ = bon_run
    fn = tmp_path / "fns.py"
    fn.write_text(FUNCTION)
    out = tmp_path / "labels.jsonl"
    summary = run(judge("--input", str(root / "bon" / "pairs.jsonl"), "--output", str(out),
                        "--reward-fn", f"{fn}:longest"))
    assert summary["judged"] == len(read_jsonl(root / "bon" / "pairs.jsonl"))
    for r in LabelFile(out).read():
        lengths = [len(x) for x in r["responses"]]
        if r["decision"] == "chose":
            assert lengths[r["ranks"].index(0)] > lengths[r["ranks"].index(1)]


def test_a_judge_without_a_chat_template_cannot_read_conversations(bon_run, tiny_models, tmp_path):
    from tether.recipes.judge import run

    root, _, _ = bon_run
    with pytest.raises(DataError, match=r"pairs\.jsonl:1: conversational prompts .* chat template"):
        run(judge("--input", str(root / "bon" / "pairs.jsonl"), "--output", str(tmp_path / "l.jsonl"),
                  "--judge", str(tiny_models["gpt2"])))


# ----------------------------------------------------------------------------- tether iterate


@pytest.mark.slow
def test_iterate_samples_chat_prompts_and_an_lm_judge_labels_them(bon_run, chat_model, tmp_path, capsys):
    root, _, _ = bon_run
    prompts = write_jsonl(tmp_path / "prompts.jsonl",
                          [{"messages": [{"role": "system", "content": "be good"}, *user(q)]} for q in QUESTIONS])
    out = tmp_path / "iter"
    args = ["iterate", "--policy", str(chat_model), "--prompts", str(prompts), "--output-dir", str(out),
            "--rounds", "1", "--prompts-per-round", "4", "--k", "2", "--rm-steps", "1", "--rm-batch-size", "2",
            "--ppo-steps", "1", "--ppo-batch-size", "4", "--response-length", "5", "--temperature", "1.5",
            "--heldout-fraction", "0.3", "--no-progress", "--no-tensorboard"]
    assert main(args) == 2  # the default world rater reads only the world's prompts
    assert "the built-in world's rater" in capsys.readouterr().err and not out.exists()
    assert main(args + ["--labeler", "judge", "--judge", str(chat_model),
                        "--labels", str(root / "bon" / "pairs.jsonl")]) == 0
    system = {"role": "system", "content": "be good"}
    candidates = read_jsonl(out / "round-1" / "candidates.jsonl")
    assert candidates and all(c["prompt"][0] == system and len(c["prompt"]) == 2 for c in candidates)
    labels = LabelFile(out / "round-1" / "labels.jsonl").read()
    assert labels and all(r["prompt"][0] == system for r in labels)
    # the RM's data: bon's conversational pairs and the round's labels, all rendered in ChatML
    rm_rows = read_jsonl(out / "round-1" / "rm_data.jsonl")
    assert rm_rows and all(r["chat"] is True and r["prompt"].startswith("<|im_start|>") for r in rm_rows)
    assert any(r["prompt"].startswith("<|im_start|>system\nbe good<|im_end|>") for r in rm_rows)
    assert (out / "round-1" / "ppo" / "model.safetensors").exists()
