"""`tether bon` and `tether eval` on their own (the demo runs them only with the world judge)."""

import json

import pytest
import torch

from conftest import write_jsonl
from tether.cli import main
from tether.models.load import load_tokenizer
from tether.models.reward import load_reward_model, score_texts


@pytest.fixture
def rm_and_prompts(tiny_models, tmp_path):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [
        {"prompt": "the cat", "chosen": " sat on the mat", "rejected": " ran ran ran"}] * 8)
    rm = tmp_path / "rm"
    assert main(["rm", "--model", str(tiny_models["llama"]), "--data", str(pairs), "--output-dir", str(rm),
                 "--max-steps", "2", "--batch-size", "4", "--lr", "1e-2", "--eval-fraction", "0",
                 "--no-progress", "--no-tensorboard"]) == 0
    prompts = write_jsonl(tmp_path / "prompts.jsonl",
                          [{"prompt": p} for p in ("the cat", "a dog ran", "once upon a time", "the sun")])
    return rm, prompts


def test_bon_keeps_the_highest_scoring_of_n_samples(tiny_models, rm_and_prompts, tmp_path):
    rm, prompts = rm_and_prompts
    out = tmp_path / "bon"
    assert main(["bon", "--policy", str(tiny_models["llama"]), "--reward-model", str(rm),
                 "--prompts", str(prompts), "--output-dir", str(out), "--n", "4",
                 "--response-length", "8", "--batch-size", "3", "--no-progress"]) == 0
    rows = [json.loads(line) for line in (out / "bon.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["the cat", "a dog ran", "once upon a time", "the sun"]
    # the scores are the reward model's own (calibrated) scores, recomputed here from outside bon
    model, tok = load_reward_model(str(rm)).eval(), load_tokenizer(str(rm))
    for row in rows:
        assert len(row["responses"]) == len(row["scores"]) == 4
        again = score_texts(model, tok, [row["prompt"]] * 4, row["responses"])
        assert again == pytest.approx(row["scores"], abs=1e-4)
        assert row["score"] == max(row["scores"])
        assert row["response"] == row["responses"][row["scores"].index(row["score"])]
    pairs = [json.loads(line) for line in (out / "pairs.jsonl").read_text().splitlines()]
    for pair, row in zip(pairs, (r for r in rows if len(set(r["responses"])) > 1)):
        worst = row["responses"][row["scores"].index(min(row["scores"]))]
        assert (pair["chosen"], pair["rejected"]) == (row["response"], worst)


def test_eval_with_a_reward_model_judge_and_a_response_file(tiny_models, rm_and_prompts, tmp_path):
    rm, prompts = rm_and_prompts
    # policy A is a file of fixed answers; B is a model. The judge is the reward model.
    answers = write_jsonl(tmp_path / "a.jsonl", [{"prompt": p, "response": " sat on the mat"}
                                                 for p in ("the cat", "a dog ran", "once upon a time", "the sun")])
    out = tmp_path / "eval.json"
    assert main(["eval", "--policy-a", str(answers), "--policy-b", str(tiny_models["llama"]),
                 "--prompts", str(prompts), "--judge", str(rm), "--output", str(out),
                 "--response-length", "6", "--no-progress"]) == 0
    result = json.loads(out.read_text())
    assert result["prompts"] == 4 and result["judge"] == str(rm)
    assert result["wins"] + result["ties"] + result["losses"] == 4
    assert result["win_rate"] == pytest.approx((result["wins"] + 0.5 * result["ties"]) / 4)
    assert result["ci95_low"] <= result["win_rate"] <= result["ci95_high"]
    model, tok = load_reward_model(str(rm)).eval(), load_tokenizer(str(rm))
    expected = score_texts(model, tok, ["the cat", "a dog ran", "once upon a time", "the sun"], [" sat on the mat"] * 4)
    assert result["score_a_mean"] == pytest.approx(sum(expected) / 4, abs=1e-4)


def test_chat_prompts_are_sampled_and_scored_without_added_special_tokens(tiny_models):
    """Rendered chat prompts (e.g. DPO's KL samples from chat rows) keep the template's own
    special tokens only: the Llama tokenizer here adds BOS to plain prompts, not to these."""
    from transformers import AutoModelForCausalLM

    from conftest import CHATML
    from tether.data.tokenize import encode_prompt, encode_response
    from tether.eval.sampling import response_logprobs, sample_responses

    tok = load_tokenizer(str(tiny_models["llama"]), padding_side="left")
    tok.chat_template = CHATML
    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"]).eval()
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                     add_generation_prompt=True)
    ids = encode_response(tok, prompt)
    assert ids[0] != tok.bos_token_id
    samples = sample_responses(model, tok, [prompt], n=2, max_new_tokens=3, chat=True)
    assert samples.chat is True
    response = samples.response_ids[0]
    with torch.no_grad():
        logits = model(torch.tensor([ids + response])).logits[0, len(ids) - 1:-1]
    by_hand = logits.log_softmax(-1).gather(-1, torch.tensor(response)[:, None]).sum().item()
    assert response_logprobs(model, tok, [prompt], [response], chat=True)[0] == pytest.approx(by_hand, abs=1e-4)
    if encode_prompt(tok, prompt)[0] == tok.bos_token_id:  # the stories tokenizer adds BOS
        assert response_logprobs(model, tok, [prompt], [response])[0] != pytest.approx(by_hand, abs=1e-4)


def _policy_and_perturbed_reference(tiny_models):
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(str(tiny_models["llama"]), padding_side="left")
    policy = AutoModelForCausalLM.from_pretrained(tiny_models["llama"]).eval()
    reference = AutoModelForCausalLM.from_pretrained(tiny_models["llama"]).eval()
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return tok, policy, reference


def _logprob_sums(model, tok, samples, temperature, top_k=0):
    """log p(response | prompt) of each sample by hand, under softmax(logits / T) truncated to
    the top_k scores when top_k > 0."""
    out = []
    for prompt, response in zip(samples.prompts, samples.response_ids):
        ids = tok(prompt)["input_ids"]
        with torch.no_grad():
            scores = model(torch.tensor([ids + response])).logits[0, len(ids) - 1:-1] / temperature
        if top_k:
            kth = scores.topk(top_k, dim=-1).values[:, -1:]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        lp = scores.log_softmax(-1).gather(-1, torch.tensor(response)[:, None])
        assert torch.isfinite(lp).all()  # with top_k: every sampled token is in the top k
        out.append(lp.sum().item())
    return out


def _mean_difference(a, b):
    return sum(x - y for x, y in zip(a, b)) / len(a)


def test_kl_to_reference_reads_both_models_at_the_sampling_temperature(tiny_models):
    """Samples drawn at T come from softmax(logits / T): the KL estimate must read the policy and
    the reference at the same T, or it measures nothing (it used to read them at T = 1)."""
    from tether.eval.sampling import kl_to_reference, sample_responses

    tok, policy, reference = _policy_and_perturbed_reference(tiny_models)
    samples = sample_responses(policy, tok, ["the cat", "a dog ran"], n=2, max_new_tokens=4,
                               temperature=0.5, seed=1)
    assert samples.temperature == 0.5
    expected = _mean_difference(_logprob_sums(policy, tok, samples, 0.5),
                                _logprob_sums(reference, tok, samples, 0.5))
    at_one = _mean_difference(_logprob_sums(policy, tok, samples, 1.0),
                              _logprob_sums(reference, tok, samples, 1.0))
    kl = kl_to_reference(policy, reference, tok, samples)
    assert kl == pytest.approx(expected, abs=1e-4)
    assert kl != pytest.approx(at_one, abs=1e-3)


def test_kl_to_reference_reads_the_policy_truncated_as_it_was_sampled(tiny_models):
    """Samples drawn with top-k come from the policy's top-k distribution, renormalised: that is
    the pi of KL(pi || ref). The reference stays whole (it is what the KL is measured to)."""
    from tether.eval.sampling import kl_to_reference, sample_responses

    tok, policy, reference = _policy_and_perturbed_reference(tiny_models)
    samples = sample_responses(policy, tok, ["the cat", "a dog ran"], n=2, max_new_tokens=4,
                               temperature=0.8, top_k=3, seed=2)
    assert (samples.temperature, samples.top_k, samples.top_p) == (0.8, 3, 1.0)
    whole_reference = _logprob_sums(reference, tok, samples, 0.8)
    expected = _mean_difference(_logprob_sums(policy, tok, samples, 0.8, top_k=3), whole_reference)
    untruncated = _mean_difference(_logprob_sums(policy, tok, samples, 0.8), whole_reference)
    kl = kl_to_reference(policy, reference, tok, samples)
    assert kl == pytest.approx(expected, abs=1e-4)
    assert kl != pytest.approx(untruncated, abs=1e-3)
