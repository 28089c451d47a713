"""data/prompts.py: the prompts of the sampling stages, plain or conversational, and how a
reward model or judge reads a conversation (`render_for_scoring`)."""

import pytest

from conftest import CHATML, write_jsonl
from tether.data.preference import render_for_scoring
from tether.data.prompts import prompt_key, read_prompts, render_prompts, shown_text
from tether.errors import DataError
from tether.models.load import load_tokenizer

CHAT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what is a cat"}]


def test_every_prompt_form_reads_as_a_string_or_its_messages(tmp_path):
    plain = write_jsonl(tmp_path / "plain.jsonl", [{"prompt": "the cat"}, {"prompt": "a dog"}])
    trl = write_jsonl(tmp_path / "trl.jsonl", [{"prompt": CHAT}, {"prompt": CHAT[1:]}])
    sft = write_jsonl(tmp_path / "sft.jsonl", [{"messages": CHAT + [{"role": "assistant", "content": "a pet"}]}])
    assert read_prompts(str(plain)) == ["the cat", "a dog"]
    assert read_prompts(str(plain), limit=1) == ["the cat"]
    assert read_prompts(str(trl)) == [CHAT, CHAT[1:]]
    assert read_prompts(str(sft)) == [CHAT]  # the final assistant turn is the answer, not the prompt
    with pytest.raises(DataError, match=r"bad\.jsonl:2: column 'prompt' holds a number"):
        read_prompts(str(write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "x"}, {"prompt": 3}])))


def test_conversations_render_in_the_chat_template_and_need_one(tiny_models, tmp_path):
    chat_tok = load_tokenizer(str(tiny_models["qwen2"]))
    texts, chat = render_prompts(chat_tok, [CHAT, "the cat"], "p.jsonl")
    assert texts == [("<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nwhat is a cat<|im_end|>\n"
                      "<|im_start|>assistant\n"), "the cat"]
    assert chat == [True, False]
    plain_tok = load_tokenizer(str(tiny_models["gpt2"]))
    with pytest.raises(DataError, match=r"p\.jsonl prompt 1: conversational prompts .* chat template"):
        render_prompts(plain_tok, [CHAT], "p.jsonl")
    assert render_prompts(plain_tok, ["the cat"], "p.jsonl") == (["the cat"], [False])


def test_a_scorer_reads_a_conversation_in_its_own_template_else_the_policys_text(tiny_models):
    chat_tok = load_tokenizer(str(tiny_models["qwen2"]))
    text, responses, chat = render_for_scoring(chat_tok, CHAT, ["a pet", "a dog"])
    assert text.endswith("<|im_start|>user\nwhat is a cat<|im_end|>\n<|im_start|>assistant\n")
    assert (responses, chat) == (["a pet", "a dog"], True)  # the content, less the closing <|im_end|>
    plain_tok = load_tokenizer(str(tiny_models["gpt2"]))
    assert render_for_scoring(plain_tok, CHAT, ["a pet"], fallback="policy text") == ("policy text", ["a pet"], False)
    with pytest.raises(DataError, match="labels.jsonl:3: conversational prompts .* has none"):
        render_for_scoring(plain_tok, CHAT, ["a pet"], where="labels.jsonl:3")
    assert render_for_scoring(plain_tok, "the cat", ["x"], chat=True) == ("the cat", ["x"], True)


def test_score_texts_scores_a_conversation_as_its_rendering(tiny_models):
    from tether.models.reward import init_reward_model, score_texts

    tok = load_tokenizer(str(tiny_models["qwen2"]))
    model = init_reward_model(str(tiny_models["qwen2"]), pad_token_id=tok.pad_token_id, seed=1).eval()
    rendered = tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    by_messages = score_texts(model, tok, [CHAT, CHAT], ["a pet", "the dog ran"])
    assert by_messages == pytest.approx(score_texts(model, tok, [rendered] * 2, ["a pet", "the dog ran"], chat=True))
    assert by_messages != pytest.approx(score_texts(model, tok, ["what is a cat"] * 2, ["a pet", "the dog ran"]))


def test_prompt_keys_and_shown_text():
    assert prompt_key("the cat") == "the cat"
    assert prompt_key(CHAT) == prompt_key([{"content": m["content"], "role": m["role"]} for m in CHAT])
    assert prompt_key(CHAT) != prompt_key(CHAT[1:])
    assert shown_text(CHAT) == "system: be brief\n\nuser: what is a cat"


def test_sampling_takes_a_chat_flag_per_prompt(tiny_models):
    """A rendered template gets no added special tokens, a plain prompt the tokenizer's own (the
    tiny Llama adds BOS): the per-prompt flags reach the sampler and the log-probabilities."""
    from transformers import AutoModelForCausalLM

    from tether.eval.sampling import response_logprobs, sample_responses

    tok = load_tokenizer(str(tiny_models["llama"]), padding_side="left")
    tok.chat_template = CHATML
    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"]).eval()
    texts, chat = render_prompts(tok, [CHAT, "the cat"], "p")
    samples = sample_responses(model, tok, texts, n=2, max_new_tokens=3, chat=chat)
    assert samples.chat == [True, True, False, False]
    mixed = response_logprobs(model, tok, samples.prompts, samples.response_ids, chat=samples.chat)
    alone = [response_logprobs(model, tok, [p], [r], chat=c)[0]
             for p, r, c in zip(samples.prompts, samples.response_ids, samples.chat)]
    assert mixed == pytest.approx(alone, abs=1e-4)
    wrong = response_logprobs(model, tok, samples.prompts[:1], samples.response_ids[:1], chat=False)
    assert wrong[0] != pytest.approx(mixed[0], abs=1e-4)  # with a BOS added, another context


def test_a_rendered_row_marked_chat_gets_no_added_special_tokens(tiny_models, tmp_path):
    """tether iterate writes conversations rendered and marked `"chat": true` into the RM's data:
    read back, their prompts are encoded as the template wrote them (the tiny Llama adds BOS to
    a plain prompt, not to these)."""
    from tether.data.io import load_rows
    from tether.data.preference import read_preference_rows, tokenize_groups

    tok = load_tokenizer(str(tiny_models["llama"]))
    tok.chat_template = CHATML
    text = tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    src = str(write_jsonl(tmp_path / "rm_data.jsonl", [
        {"prompt": text, "responses": ["a pet", "no"], "ranks": [0, 1], "chat": True},
        {"prompt": text, "responses": ["a pet", "no"], "ranks": [0, 1]}]))
    rows = read_preference_rows(load_rows(src), src, tokenizer=tok)
    assert [r.get("chat", False) for r in rows] == [True, False]
    marked, plain = tokenize_groups(rows, tok, 512, "truncate", src)
    assert marked.prompt_ids[0] != tok.bos_token_id and plain.prompt_ids[0] == tok.bos_token_id
