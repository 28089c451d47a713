"""Bad input gets a clear error: data readers and SFT tokenisation."""

import gzip
import json
import logging

import pytest

from tether.data.io import load_rows, require_columns
from tether.data.sft import IGNORE, tokenize_prompt_completion, tokenize_sft
from tether.errors import DataError
from tether.models.load import load_tokenizer

from conftest import write_jsonl


def test_malformed_json_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n\n{"prompt": "c", "completion": \n')
    with pytest.raises(DataError, match=r"bad\.jsonl:3: malformed JSON"):
        load_rows(str(path))


def test_a_cut_off_line_is_reported_at_its_own_end(tmp_path):
    path = tmp_path / "cut.jsonl"
    path.write_text('{"prompt": "a"}\n{"prompt": "Lily saw a"\n{"prompt": "b"}\n')
    with pytest.raises(DataError, match=r"cut\.jsonl:2: malformed JSON \(Expecting ',' delimiter at column 24\)"):
        load_rows(str(path))


def test_non_object_line_is_reported(tmp_path):
    path = tmp_path / "list.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n[1, 2]\n')
    with pytest.raises(DataError, match=r"list\.jsonl:2: expected a JSON object"):
        load_rows(str(path))


def test_gzip_json_lines(tmp_path):
    path = tmp_path / "d.jsonl.gz"
    with gzip.open(path, "wt") as fh:
        fh.write(json.dumps({"prompt": "a", "completion": "b"}) + "\n")
    assert load_rows(str(path))[0]["completion"] == "b"


def test_empty_dataset(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n")
    with pytest.raises(DataError, match="empty"):
        load_rows(str(path))


def test_missing_columns_are_named_with_found_columns(tmp_path):
    ds = load_rows(str(write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "answer": "b"}])))
    with pytest.raises(DataError) as err:
        require_columns(ds, ["prompt", "completion"], "d.jsonl")
    assert "'completion'" in str(err.value) and "found columns: prompt, answer" in str(err.value)


def test_empty_column_values_are_named(tmp_path):
    rows = [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": ""}]
    ds = load_rows(str(write_jsonl(tmp_path / "d.jsonl", rows)))
    with pytest.raises(DataError, match=r"column 'completion' is empty \(or whitespace only\) in 1 "
                                        r"row\(s\): d.jsonl:2;"):
        require_columns(ds, ["prompt", "completion"], "d.jsonl")


def test_other_formats_round_trip(tmp_path):
    from datasets import Dataset

    rows = [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(3)]
    Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    Dataset.from_list(rows).to_csv(str(tmp_path / "d.csv"), index=False)
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "d.json").write_text(json.dumps(rows))
    for name in ("d.parquet", "d.csv", "saved", "d.json"):
        ds = load_rows(str(tmp_path / name))
        assert [r["completion"] for r in ds] == ["c0", "c1", "c2"], name


def test_missing_file_that_is_not_a_hub_id(tmp_path):
    with pytest.raises(DataError, match="nope.jsonl: no such file or directory"):
        load_rows(str(tmp_path / "nope.jsonl"))


def test_tokenizer_without_pad_gets_one_and_says_so(stories, caplog):
    with caplog.at_level(logging.INFO, logger="tether"):
        tok = load_tokenizer(str(stories))
    assert tok.pad_token_id == 0 and tok.pad_token_id != tok.eos_token_id
    assert "no pad token" in caplog.text


def test_prompt_tokens_get_no_loss(stories):
    tok = load_tokenizer(str(stories))
    ex = tokenize_prompt_completion(tok, "Once upon a time", " there was a cat.")
    n_prompt = len(tok("Once upon a time")["input_ids"])  # includes BOS
    assert ex.labels[:n_prompt] == [IGNORE] * n_prompt
    assert ex.labels[n_prompt:] == ex.input_ids[n_prompt:]
    assert ex.input_ids[-1] == tok.eos_token_id  # the final EOS is scored: the model learns to stop
    assert tok.decode(ex.input_ids[n_prompt:-1]) .strip() == "there was a cat."


def test_over_length_examples_are_truncated_or_dropped_and_counted(stories, tmp_path, caplog):
    tok = load_tokenizer(str(stories))
    rows = [{"prompt": "Hi", "completion": " short."},
            {"prompt": "Hi", "completion": " a very long story " * 20},
            {"prompt": "a long prompt " * 30, "completion": " x"}]
    ds = load_rows(str(write_jsonl(tmp_path / "d.jsonl", rows)))
    with caplog.at_level(logging.WARNING, logger="tether"):
        kept = tokenize_sft(ds, tok, "d.jsonl", max_length=32, over_length="truncate")
    assert len(kept) == 2 and all(len(e.input_ids) <= 32 for e in kept)
    assert "1 were truncated and 1 dropped" in caplog.text.replace("example(s) longer than --max-length 32 ", "")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tether"):
        kept = tokenize_sft(ds, tok, "d.jsonl", max_length=32, over_length="drop")
    assert len(kept) == 1 and "0 were truncated and 2 dropped" in caplog.text.replace(
        "example(s) longer than --max-length 32 ", "")
    with pytest.raises(DataError, match="raise --max-length"):
        tokenize_sft(ds, tok, "d.jsonl", max_length=2, over_length="drop")


def test_chat_messages_score_only_assistant_turns(tiny_models):
    tok = load_tokenizer(str(tiny_models["qwen2"]))
    from tether.data.sft import tokenize_messages

    msgs = [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "hello you"},
            {"role": "user", "content": "why"}, {"role": "assistant", "content": "good question"}]
    ex = tokenize_messages(tok, msgs, "row 1")
    scored = tok.decode([t for t, l in zip(ex.input_ids, ex.labels) if l != IGNORE])
    assert scored == "hello you<|im_end|>\ngood question<|im_end|>\n"


def test_messages_without_chat_template_is_an_error(stories):
    from tether.data.sft import tokenize_messages

    tok = load_tokenizer(str(stories))
    with pytest.raises(DataError, match="chat template"):
        tokenize_messages(tok, [{"role": "user", "content": "x"}], "row 1")
