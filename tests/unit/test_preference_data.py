"""Preference data: the three formats, every bad-input case (error or counted skip), length
handling and collation."""

import gzip
import json
import logging
from collections import Counter

import pytest

from tether.data.io import load_rows
from tether.data.preference import (HH_MARKER, Group, collate_groups, fit_to_length,
                                    load_preference_groups, read_preference_rows,
                                    split_hh_dialogue, tokenize_groups)
from tether.errors import DataError
from tether.models.load import load_tokenizer

from conftest import HH_RLHF, STORIES, write_jsonl


def _rows(tmp_path, rows, name="d.jsonl"):
    path = write_jsonl(tmp_path / name, rows)
    return load_rows(str(path)), str(path)


def _read(tmp_path, rows):
    ds, src = _rows(tmp_path, rows)
    skipped = Counter()
    return read_preference_rows(ds, src, skipped), skipped


@pytest.fixture(scope="module")
def tok():
    if not STORIES.exists():
        pytest.skip("stories260K tokenizer not available")
    return load_tokenizer(str(STORIES))


# ----------------------------------------------------------------------------- pairs


def test_pairs_become_groups_of_two_with_margin_and_gold(tmp_path):
    rows, skipped = _read(tmp_path, [
        {"prompt": "p", "chosen": " good", "rejected": " bad", "margin": 2,
         "gold_chosen": 1.5, "gold_rejected": -0.5}])
    assert rows == [{"prompt": "p", "responses": [" good", " bad"], "ranks": [0, 1], "margin": 2.0,
                     "gold": [1.5, -0.5], "row": 0}]
    assert not skipped


def test_identical_chosen_and_rejected_is_skipped_counted_and_logged(tmp_path, caplog):
    data = [{"prompt": "p", "chosen": " same", "rejected": " same"},
            {"prompt": "p", "chosen": " a", "rejected": " b"},
            {"prompt": "q", "chosen": " x", "rejected": " x"}]
    with caplog.at_level(logging.WARNING, logger="tether"):
        rows, skipped = _read(tmp_path, data)
    assert [r["row"] for r in rows] == [1]
    assert skipped == {"identical": 2}
    assert "skipped 2 of 3 row(s): 2 identical chosen and rejected" in caplog.text


def test_all_rows_skipped_is_an_error(tmp_path):
    ds, src = _rows(tmp_path, [{"prompt": "p", "chosen": " s", "rejected": " s"}])
    with pytest.raises(DataError, match="no usable preference rows.*1 identical"):
        read_preference_rows(ds, src)


def test_unknown_columns_and_bad_types_are_reported(tmp_path):
    ds, src = _rows(tmp_path, [{"question": "p", "answer": "a"}])
    with pytest.raises(DataError, match="not preference data.*found columns: question, answer"):
        read_preference_rows(ds, src)
    ds, src = _rows(tmp_path, [{"prompt": "p", "chosen": " a", "rejected": " b", "margin": "big"}], "m.jsonl")
    with pytest.raises(DataError, match=r"m\.jsonl:1: 'margin' must be a number"):
        read_preference_rows(ds, src)


# ----------------------------------------------------------------------------- hh-rlhf


def test_hh_dialogues_split_at_the_last_assistant_turn(tmp_path):
    prefix = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how are you?\n\nAssistant:"
    rows, skipped = _read(tmp_path, [{"chosen": prefix + " fine, thanks", "rejected": prefix + " go away"}])
    assert rows[0]["prompt"] == prefix and rows[0]["prompt"].endswith(HH_MARKER)
    assert rows[0]["responses"] == [" fine, thanks", " go away"] and rows[0]["ranks"] == [0, 1]
    assert split_hh_dialogue("no turns here") is None


def test_hh_rows_without_assistant_are_skipped_or_an_error_when_all_are(tmp_path, caplog):
    good = {"chosen": "\n\nHuman: q\n\nAssistant: a", "rejected": "\n\nHuman: q\n\nAssistant: b"}
    bad = {"chosen": "\n\nHuman: q (no reply)", "rejected": "\n\nHuman: q (none)"}
    with caplog.at_level(logging.WARNING, logger="tether"):
        rows, skipped = _read(tmp_path, [good, bad, bad])
    assert len(rows) == 1 and skipped == {"no_assistant": 2}
    assert "2 no assistant turn to split at ('\\n\\nAssistant:' in text" in caplog.text
    ds, src = _rows(tmp_path, [bad, bad], "all_bad.jsonl")
    with pytest.raises(DataError, match="no usable preference rows.*2 no assistant turn"):
        read_preference_rows(ds, src)


def test_hh_response_that_continues_the_dialogue_splits_at_the_shared_prompt(tmp_path):
    prompt = "\n\nHuman: name a singer\n\nAssistant:"
    chosen = prompt + " Bob Marley"
    rejected = prompt + " Let me think.\n\nHuman: ok\n\nAssistant: Elvis"  # the model kept going
    rows, _ = _read(tmp_path, [{"chosen": chosen, "rejected": rejected}])
    assert rows[0]["prompt"] == prompt
    assert rows[0]["responses"] == [" Bob Marley", " Let me think.\n\nHuman: ok\n\nAssistant: Elvis"]


def test_hh_identical_dialogues_are_skipped(tmp_path):
    same = "\n\nHuman: q\n\nAssistant: a"
    _, skipped = _read(tmp_path, [{"chosen": same, "rejected": same},
                                  {"chosen": same, "rejected": same + "b"}])
    assert skipped == {"identical": 1}


@pytest.mark.skipif(not (HH_RLHF / "test.jsonl.gz").exists(), reason="hh-rlhf data not available")
def test_real_hh_rlhf_rows_parse_and_reassemble():
    path = HH_RLHF / "test.jsonl.gz"
    raw = [json.loads(line) for line in gzip.open(path, "rt", encoding="utf-8")]
    skipped = Counter()
    rows = read_preference_rows(load_rows(str(path)), str(path), skipped)
    assert skipped == {"identical": 1}  # the file holds one pair with chosen == rejected
    assert len(rows) == len(raw) - 1
    for r in rows:
        src = raw[r["row"]]
        assert r["prompt"].startswith("\n\nHuman:") and r["prompt"].endswith(HH_MARKER)
        assert r["prompt"] + r["responses"][0] == src["chosen"]
        assert r["prompt"] + r["responses"][1] == src["rejected"]
    # in all but a few rows the last "Assistant:" turn of both dialogues is the split point
    plain = sum(split_hh_dialogue(raw[r["row"]]["chosen"])[0] == r["prompt"] for r in rows)
    assert plain >= len(rows) - 10


# ----------------------------------------------------------------------------- K-wise


def test_ranked_rows_with_ties(tmp_path):
    rows, skipped = _read(tmp_path, [
        {"prompt": "p", "responses": ["a", "b", "c", "d"], "ranks": [1, 0, 1, 2], "gold": [1, 2, 1, 0]},
        {"prompt": "p", "responses": ["a", "b"], "ranks": [0, 0]},
        {"prompt": "p", "responses": ["a"], "ranks": [0]}])
    assert skipped == {"all_tied": 2}
    group = Group([1], [[5], [6], [7], [8]], rows[0]["ranks"])
    # ties (responses 0 and 2) give no pair: 5 pairs instead of C(4,2) = 6
    assert sorted(group.pairs()) == [(0, 3), (1, 0), (1, 2), (1, 3), (2, 3)]
    assert rows[0]["gold"] == [1.0, 2.0, 1.0, 0.0]


@pytest.mark.parametrize("row, message", [
    ({"prompt": "p", "responses": ["a", "b", "c"], "ranks": [0, 1]},
     r"d\.jsonl:1: 3 responses but 2 ranks"),
    ({"prompt": "p", "responses": ["a", "b", "c"], "ranks": [0, None, 1]},
     r"d\.jsonl:1: rank of response 1 is missing"),
    ({"prompt": "p", "responses": ["a", "b", "c"], "ranks": [0, 2, 3]},
     r"d\.jsonl:1: ranks \[0, 2, 3\] skip rank\(s\) \[1\]"),
    ({"prompt": "p", "responses": ["a", "b", "a"], "ranks": [0, 1, 2]},
     r"d\.jsonl:1: responses 0 and 2 are the same text with different ranks"),
    ({"prompt": "p", "responses": ["a", "b"], "ranks": [0, -1]},
     r"d\.jsonl:1: rank of response 1 is missing or not a non-negative integer"),
])
def test_bad_rankings_are_errors_naming_the_row(tmp_path, row, message):
    ds, src = _rows(tmp_path, [row])
    with pytest.raises(DataError, match=message):
        read_preference_rows(ds, src)


# ----------------------------------------------------------------------------- tokens


def test_fit_to_length_cuts_the_prompt_start_and_the_response_end():
    bos = [1]
    prompt = bos + list(range(100, 120))  # 21 tokens
    responses = [list(range(200, 230)), list(range(300, 305))]  # 30 and 5 tokens
    # window 20: the responses need 30 > 10, so each side gets half: prompt BOS + last 9
    p, rs = fit_to_length(prompt, responses, 20, n_special=1)
    assert p == [1] + list(range(111, 120))
    assert rs == [list(range(200, 210)), list(range(300, 305))]
    # a short prompt is kept whole, and the responses get the rest of the window
    p, rs = fit_to_length([1, 2, 3], responses, 20, n_special=1)
    assert p == [1, 2, 3] and rs[0] == list(range(200, 217))
    assert fit_to_length(prompt, responses, 2, n_special=1) is None


def test_over_length_groups_are_truncated_or_dropped_and_counted(tmp_path, tok, caplog):
    data = [{"prompt": "Once upon a time", "chosen": " a cat" * 40, "rejected": " a dog" * 40},
            {"prompt": "Once", "chosen": " yes", "rejected": " no"}]
    path = str(write_jsonl(tmp_path / "long.jsonl", data))
    skipped = Counter()
    with caplog.at_level(logging.WARNING, logger="tether"):
        groups = load_preference_groups(path, tok, 32, "truncate", skipped)
    assert len(groups) == 2 and skipped == {"truncated": 1}
    assert all(len(s) <= 32 for g in groups for s in g.sequences)
    assert "1 truncated, 0 dropped" in caplog.text
    skipped = Counter()
    groups = load_preference_groups(path, tok, 32, "drop", skipped)
    assert [g.row for g in groups] == [1] and skipped == {"dropped_over_length": 1}


def test_responses_identical_after_truncation_are_dropped(tok):
    rows = [{"prompt": "Once", "responses": [" the cat sat" + " x" * 30, " the cat sat" + " y" * 30],
             "ranks": [0, 1], "row": 0}]
    skipped = Counter()
    with pytest.raises(DataError, match="longer than --max-length 6"):
        tokenize_groups(rows, tok, 6, "truncate", "mem", skipped)
    assert skipped == {"truncated_to_identical": 1}


def test_sequences_are_prompt_plus_response_without_eos(tok):
    from tether.data.tokenize import encode_prompt, encode_response

    rows = [{"prompt": "Once upon", "responses": [" a time", " the end"], "ranks": [1, 0], "row": 3}]
    (group,) = tokenize_groups(rows, tok, 64, "truncate", "mem")
    assert group.sequences[0] == encode_prompt(tok, "Once upon") + encode_response(tok, " a time")
    assert tok.eos_token_id not in group.sequences[0] and group.row == 3
    assert group.pairs() == [(1, 0)]


def test_collate_flattens_groups_into_one_batch():
    groups = [Group([1, 2], [[3], [4, 5], [6]], [2, 0, 1], gold=[0.0, 1.0, 0.5]),
              Group([1], [[7, 8, 9], [10]], [0, 1], margin=1.5)]
    batch = collate_groups(groups, pad_id=0, with_margin=True)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 0], [1, 2, 4, 5], [1, 2, 6, 0],
                                           [1, 7, 8, 9], [1, 10, 0, 0]]
    assert batch["attention_mask"].sum(1).tolist() == [3, 4, 3, 4, 2]
    assert batch["slots"].tolist() == [[0, 1, 2], [3, 4, -1]]
    assert batch["ranks"].tolist() == [[2, 0, 1], [0, 1, 0]]
    assert batch["pair_weight"].tolist() == pytest.approx([1 / 3, 1.0])
    assert batch["margin"].tolist() == [0.0, 1.5]
    assert "gold" not in batch  # gold accuracy is only computed where the recipe asks for it


def test_encode_for_scoring_cuts_a_row_together_and_never_drops(tok):
    from tether.data.preference import encode_for_scoring
    from tether.data.tokenize import encode_prompt, encode_response

    prompt, responses = "Once upon a time there was a cat", [" it sat" * 20, " no"]
    prompt_ids = encode_prompt(tok, prompt)
    assert len(prompt_ids) <= 12  # so the prompt fits whole next to half a window of response
    seqs = encode_for_scoring(tok, prompt, responses, max_length=24)
    assert len(seqs[0]) == 24 and seqs[0][:len(prompt_ids)] == prompt_ids
    assert seqs[1] == prompt_ids + encode_response(tok, " no")  # the same prompt context
    assert all(len(s) <= 3 for s in encode_for_scoring(tok, prompt * 5, [""], max_length=3))


# ----------------------------------------------------------------------------- conversational


@pytest.fixture(scope="module")
def chat_tok(tmp_path_factory):
    from conftest import _bpe_tokenizer

    return _bpe_tokenizer(tmp_path_factory.mktemp("chat_tok"), chat=True)


def _user(text):
    return {"role": "user", "content": text}


def _bot(text):
    return {"role": "assistant", "content": text}


def test_conversational_pairs_explicit_and_implicit_prompts_give_the_same_rows(tmp_path, chat_tok):
    question = [_user("what is a cat")]
    explicit = [{"prompt": question, "chosen": [_bot("a cat is good")], "rejected": "no no no"}]
    # UltraFeedback style: whole conversations, plus a string prompt that is ignored
    implicit = [{"prompt": "what is a cat", "chosen": question + [_bot("a cat is good")],
                 "rejected": question + [_bot("no no no")]}]
    hh_like = [{"chosen": question + [_bot("a cat is good")], "rejected": question + [_bot("no no no")]}]
    got = [read_preference_rows(*_rows(tmp_path, rows, f"{i}.jsonl"), tokenizer=chat_tok)[0]
           for i, rows in enumerate((explicit, implicit, hh_like))]
    assert got[0]["prompt"] == "<|im_start|>user\nwhat is a cat<|im_end|>\n<|im_start|>assistant\n"
    assert got[0]["responses"] == ["a cat is good", "no no no"]
    assert got[0]["ranks"] == [0, 1]
    answers_only = [{"prompt": "what is a cat", "chosen": [_bot("a cat is good")],
                     "rejected": [_bot("no no no")]}]
    got.append(read_preference_rows(*_rows(tmp_path, answers_only, "a.jsonl"), tokenizer=chat_tok)[0])
    for row in got[1:]:
        assert (row["prompt"], row["responses"]) == (got[0]["prompt"], got[0]["responses"])


def test_conversational_multi_turn_prompt_is_the_shared_opening(tmp_path, chat_tok):
    opening = [_user("hi"), _bot("hello"), _user("what is a dog")]
    rows = [{"chosen": opening + [_bot("a dog is a pet")], "rejected": opening + [_bot("dog dog")]}]
    row = read_preference_rows(*_rows(tmp_path, rows), tokenizer=chat_tok)[0]
    assert row["prompt"].endswith("<|im_start|>user\nwhat is a dog<|im_end|>\n<|im_start|>assistant\n")
    assert row["prompt"].count("<|im_start|>") == 4
    assert row["responses"] == ["a dog is a pet", "dog dog"]
    longer = [{"chosen": opening + [_bot("yes"), _user("more"), _bot("a dog barks")],
               "rejected": opening + [_bot("no")]}]
    row = read_preference_rows(*_rows(tmp_path, longer, "l.jsonl"), tokenizer=chat_tok)[0]
    assert row["responses"] == ["yes<|im_end|>\n<|im_start|>user\nmore<|im_end|>\n<|im_start|>assistant\na dog barks", "no"]


def test_conversational_ranked_rows_and_skips(tmp_path, chat_tok):
    story = [_user("tell me a story")]
    as_text = [{"prompt": story, "responses": ["once", "the end", "so"], "ranks": [1, 0, 2]}]
    as_turns = [{"prompt": story, "responses": [[_bot("once")], [_bot("the end")], [_bot("so")]],
                 "ranks": [1, 0, 2]}]
    for i, rows in enumerate((as_text, as_turns)):
        row = read_preference_rows(*_rows(tmp_path, rows, f"r{i}.jsonl"), tokenizer=chat_tok)[0]
        assert row["responses"] == ["once", "the end", "so"]
        assert row["ranks"] == [1, 0, 2]
    same = [_user("q"), _bot("a")]
    no_bot = [_user("q"), _user("again")]
    skipped = Counter()
    rows = [{"chosen": same, "rejected": same},  # identical
            {"chosen": no_bot, "rejected": [_user("q"), _user("other")]},  # no assistant turn to split at
            {"chosen": same, "rejected": [_user("q"), _bot("b")]}]
    out = read_preference_rows(*_rows(tmp_path, rows, "s.jsonl"), skipped, chat_tok)
    assert len(out) == 1 and skipped == Counter(identical=1, no_assistant=1)


def test_conversational_rows_need_a_chat_template(tmp_path, tok):
    rows = [{"prompt": [_user("q")], "chosen": "a", "rejected": "b"}]
    with pytest.raises(DataError, match=r"d\.jsonl:1: conversational .* need a tokenizer with a chat template"):
        read_preference_rows(*_rows(tmp_path, rows), tokenizer=tok)
    with pytest.raises(DataError, match="chat template"):
        read_preference_rows(*_rows(tmp_path, rows))


def test_a_rendered_prompt_that_opens_with_bos_keeps_a_single_bos(tok):
    from tether.data.tokenize import encode_prompt

    plain = encode_prompt(tok, "Once upon a time")
    assert plain[0] == tok.bos_token_id and plain[1] != tok.bos_token_id
    assert encode_prompt(tok, tok.bos_token + "Once upon a time") == plain


def test_chat_rows_are_encoded_as_sft_and_ppo_encode_chat_prompts(tmp_path):
    """A tokenizer that adds BOS with a template that writes none: the rendered template owns the
    special tokens, so RM/DPO rows, PPO prompts and SFT messages all start the same way."""
    if not STORIES.exists():
        pytest.skip("stories260K tokenizer not available")
    from conftest import CHATML
    from tether.data.tokenize import encode_response
    from tether.recipes.online.data import prompt_text

    chat_tok = load_tokenizer(str(STORIES))
    chat_tok.chat_template = CHATML
    ds, src = _rows(tmp_path, [{"prompt": [_user("hi")], "chosen": "a b", "rejected": "c"}])
    rows = read_preference_rows(ds, src, tokenizer=chat_tok)
    assert rows[0]["chat"] is True
    group = tokenize_groups(rows, chat_tok, 512, "truncate", "mem")[0]
    ppo_text, _ = prompt_text(chat_tok, {"messages": [_user("hi")]}, "mem")
    assert group.prompt_ids == encode_response(chat_tok, ppo_text)
    assert group.prompt_ids[0] != chat_tok.bos_token_id  # encode_prompt would have added one
    plain = tokenize_groups([{"prompt": "hi", "responses": ["a", "b"], "ranks": [0, 1]}], chat_tok,
                            512, "truncate", "mem")[0]
    assert plain.prompt_ids[0] == chat_tok.bos_token_id


def test_online_prompts_take_trls_conversational_prompt_column(tmp_path, chat_tok):
    """`{"prompt": [messages]}` (TRL's prompt-only conversational rows) reads as `messages` does,
    and a bad row is still named by its line."""
    from tether.recipes.online.data import load_prompts

    chat = [_user("name a cat")]
    a = load_prompts(str(write_jsonl(tmp_path / "a.jsonl", [{"prompt": chat, "answer": "cat"}])),
                     chat_tok, 64, "truncate")
    b = load_prompts(str(write_jsonl(tmp_path / "b.jsonl", [{"messages": chat, "answer": "cat"}])),
                     chat_tok, 64, "truncate")
    assert a.texts == b.texts and a.ids == b.ids and a.chats == b.chats == [chat]
    assert a.texts[0] != "name a cat" and a.columns == {"answer": ["cat"]}
    for rows, needle in (([{"prompt": chat}, {"prompt": 5}], r"mixed\.jsonl:2: column 'prompt' holds a number"),
                         ([{"prompt": chat}, {"prompt": []}], r"'prompt' is empty .*mixed\.jsonl:2")):
        with pytest.raises(DataError, match=needle):
            load_prompts(str(write_jsonl(tmp_path / "mixed.jsonl", rows)), chat_tok, 64, "truncate")
    from conftest import _bpe_tokenizer

    no_template = _bpe_tokenizer(tmp_path / "plain_tok", chat=False)
    with pytest.raises(DataError, match=r"a\.jsonl:1: conversational prompts .* chat template"):
        load_prompts(str(tmp_path / "a.jsonl"), no_template, 64, "truncate")
