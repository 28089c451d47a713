"""`tether judge` end to end: a function, a reward model and an LM as the labeler; labels that
tether rm trains on as they are; the split into unsure items for people; resume; errors."""

import json
import math
from pathlib import Path

import pytest

from conftest import write_jsonl
from tether.config import RMConfig, load_config
from tether.data.io import load_rows
from tether.data.preference import read_preference_rows
from tether.errors import ConfigError, DataError
from tether.feedback.items import read_items
from tether.config import JudgeConfig
from tether.feedback.labels import LabelFile
from tether.recipes.judge import run

NAMES = ["Lily", "Tom", "Sue", "Ben", "Max", "Anna"]
THINGS = ["ball", "cat", "dog", "tree"]

REWARD_FN = '''
from pathlib import Path


def distinct(prompts, completions):
    """The share of distinct words; None for a completion that says "skip"."""
    with open(Path(__file__).with_suffix(".calls"), "a") as log:
        log.write(f"{len(completions)}\\n")
    out = []
    for c in completions:
        words = c.split()
        out.append(None if "skip" in words else len(set(words)) / len(words))
    return out


async def distinct_async(prompts, completions):
    return distinct(prompts, completions)
'''


def distinct(text):
    words = text.split()
    return len(set(words)) / len(words)


def story_pairs(n, flip_every=4):
    """Fluent (distinct words) against repetitive; every `flip_every`-th row gives them as
    chosen/rejected the wrong way round, so the input's order and the function's disagree."""
    rows = []
    for i in range(n):
        name, thing = NAMES[i % len(NAMES)], THINGS[(i // len(NAMES)) % len(THINGS)]
        good, bad = f" {thing}. {name} was very happy.", f" {thing} {thing} {thing} {thing}."
        flip = flip_every and i % flip_every == 0
        rows.append({"prompt": f"Once upon a time, {name} saw a", "chosen": bad if flip else good,
                     "rejected": good if flip else bad})
    return rows


def odd_rows():
    return [{"prompt": "a tie", "chosen": " cat dog.", "rejected": " dog cat."},
            {"prompt": "no score", "chosen": " skip me", "rejected": " fine then"},
            {"prompt": "two policies", "a": " the sun the sun", "b": " the sun is big"}]


def judge(*argv):
    return run(load_config(JudgeConfig, [*argv, "--no-progress"]))


@pytest.fixture
def reward_fn(tmp_path):
    path = tmp_path / "rewards.py"
    path.write_text(REWARD_FN)
    return path


def calls(reward_fn):
    log = Path(reward_fn).with_suffix(".calls")
    return [int(x) for x in log.read_text().split()] if log.exists() else []


def test_function_labels_follow_the_function_and_train_a_reward_model(tiny_models, reward_fn, tmp_path):
    from tether.recipes import rm

    data = write_jsonl(tmp_path / "pairs.jsonl", story_pairs(12) + odd_rows())
    out = tmp_path / "labels.jsonl"
    summary = judge("--input", str(data), "--output", str(out), "--reward-fn", f"{reward_fn}:distinct",
                    "--batch-size", "5")
    assert summary["rater"] == "fn:rewards.py:distinct"
    assert (summary["items"], summary["judged"], summary["labels_written"]) == (15, 14, 13)
    assert (summary["ties"], summary["unjudged"], summary["left_for_people"]) == (1, 1, 2)
    assert summary["mean_confidence"] == pytest.approx(13 / 14)  # 1.0 each, 0 for the tie
    # rows 0, 4 and 8 gave the repetitive response as chosen: the function disagrees there
    assert summary["agreement_with_input"] == {"comparisons": 12, "agreement": 0.75}
    assert calls(reward_fn) == [10, 10, 10]  # 15 items of 2, in chunks of 5
    assert json.loads((tmp_path / "labels.jsonl.summary.json").read_text()) == summary

    records = LabelFile(out).read()
    assert len(records) == 13 and len({r["item"] for r in records}) == 13
    for r in records:
        scores = [distinct(x) for x in r["responses"]]
        assert scores[0] != scores[1]
        assert r["ranks"] == ([0, 1] if scores[0] > scores[1] else [1, 0])
        assert (r["decision"], r["confidence"], r["rater"]) == ("chose", 1.0, "fn:rewards.py:distinct")
    [sbs] = [r for r in records if r["prompt"] == "two policies"]
    assert sbs["sources"] == ["a", "b"] and sbs["ranks"] == [1, 0]

    unsure = [json.loads(line) for line in (tmp_path / "labels.unsure.jsonl").read_text().splitlines()]
    assert {(u["prompt"], u["reason"]) for u in unsure} == {("a tie", "tie"),
                                                           ("no score", "the function returned None")}
    assert [it.prompt for it in read_items(str(tmp_path / "labels.unsure.jsonl"))] == ["a tie", "no score"]

    # the label file is preference data as it is: 13 pairs, and a reward model trains on it
    assert len(read_preference_rows(load_rows(str(out)), str(out))) == 13
    cfg = load_config(RMConfig, ["--model", str(tiny_models["llama"]), "--data", str(out),
                                 "--output-dir", str(tmp_path / "rm"), "--max-steps", "2",
                                 "--batch-size", "4", "--eval-fraction", "0", "--no-progress",
                                 "--no-tensorboard"])
    rm.run(cfg)
    assert (tmp_path / "rm" / "config.json").exists()


def test_an_async_function_is_awaited_and_labels_as_the_plain_one(reward_fn, tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", story_pairs(6) + odd_rows())
    for name in ("distinct", "distinct_async"):
        judge("--input", str(data), "--output", str(tmp_path / f"{name}.jsonl"), "--reward-fn",
              f"{reward_fn}:{name}")
    plain, awaited = (LabelFile(tmp_path / f"{n}.jsonl").read() for n in ("distinct", "distinct_async"))
    assert len(plain) == 7 and [r["ranks"] for r in awaited] == [r["ranks"] for r in plain]


def test_resume_judges_only_what_is_left(reward_fn, tmp_path):
    rows = story_pairs(8, flip_every=0) + odd_rows()[:2]
    first = write_jsonl(tmp_path / "first.jsonl", rows[:4] + rows[8:])  # with the tie and the None
    every = write_jsonl(tmp_path / "all.jsonl", rows)
    out = tmp_path / "labels.jsonl"
    args = ["--output", str(out), "--reward-fn", f"{reward_fn}:distinct"]
    s1 = judge("--input", str(first), *args)
    assert (s1["labels_written"], s1["left_for_people"]) == (4, 2)
    # a crash while the last label was written: its line is cut off
    text = out.read_text()
    out.write_text(text[:-40])
    s2 = judge("--input", str(every), *args)
    # the tie and the None are in the unsure file, 3 labels survived: 5 items left to judge
    assert (s2["items"], s2["already_judged"], s2["judged"], s2["labels_written"]) == (10, 5, 5, 5)
    assert calls(reward_fn) == [12, 10]
    records = LabelFile(out).read()
    assert sorted(r["prompt"] for r in records) == sorted(r["prompt"] for r in rows[:8])
    assert s2["labels_by_rater_in_output"] == 8
    s3 = judge("--input", str(every), *args)  # nothing left: the function is not even loaded
    assert (s3["already_judged"], s3["judged"], s3["mean_confidence"]) == (10, 0, None)
    assert calls(reward_fn) == [12, 10]
    # another rater name starts over on the same files
    s4 = judge("--input", str(first), *args, "--rater", "fn:again")
    assert (s4["already_judged"], s4["judged"], s4["unjudged"]) == (0, 5, 1)


def test_reward_model_labels_are_bradley_terry_on_its_scores(tiny_models, tmp_path):
    from tether.models.load import load_tokenizer
    from tether.models.reward import init_reward_model, load_reward_model, score_texts

    rm_dir = tmp_path / "rm-untrained"
    tok = load_tokenizer(str(tiny_models["llama"]))
    init_reward_model(str(tiny_models["llama"]), pad_token_id=tok.pad_token_id, seed=3).save_pretrained(rm_dir)
    tok.save_pretrained(rm_dir)
    data = write_jsonl(tmp_path / "pairs.jsonl", story_pairs(6) + [
        {"prompt": "three", "responses": [" a cat", " the big red ball", " ran ran"]}])
    out = tmp_path / "labels.jsonl"
    summary = judge("--input", str(data), "--output", str(out), "--reward-model", str(rm_dir),
                    "--dtype", "float32")
    assert summary["rater"] == "rm:rm-untrained" and summary["labels_written"] == 7
    model = load_reward_model(str(rm_dir)).eval()
    for r in LabelFile(out).read():
        scores = score_texts(model, tok, [r["prompt"]] * len(r["responses"]), r["responses"])
        best_first = sorted(range(len(scores)), key=lambda i: -scores[i])
        assert [r["ranks"][i] for i in best_first] == list(range(len(scores)))
        ordered = sorted(scores, reverse=True)
        weakest = min(math.tanh((hi - lo) / 2) for hi, lo in zip(ordered, ordered[1:]))
        assert r["confidence"] == pytest.approx(weakest, abs=1e-4)
        assert r["decision"] == ("ranked" if len(scores) == 3 else "chose")


def test_lm_judge_on_a_tiny_llama_writes_valid_labels(tiny_models, tmp_path, one_torch_thread):
    data = write_jsonl(tmp_path / "cands.jsonl", story_pairs(4) + [
        {"prompt": "Once upon a time", "responses": [" a cat", " the big red ball", " ran ran", " sun"]},
        {"prompt": "two policies", "a": " the sun", "b": " a tree"}])
    out = tmp_path / "labels.jsonl"
    # the tiny vocabulary has "▁A" but no "▁B"; "▁a" and "▁b" are single tokens
    summary = judge("--input", str(data), "--output", str(out), "--judge", str(tiny_models["llama"]),
                    "--answer-tokens", "a,b", "--batch-size", "4", "--dtype", "float32")
    assert summary["rater"] == "judge:llama" and summary["judged"] == 6
    assert summary["labels_written"] + summary["ties"] == 6
    assert 0 <= summary["mean_confidence"] <= 1
    records = LabelFile(out).read()
    for r in records:
        assert r["rater"] == "judge:llama" and 0 <= r["confidence"] <= 1
        assert sorted(set(r["ranks"])) == list(range(max(r["ranks"]) + 1))
        assert r["decision"] == ("chose" if len(r["responses"]) == 2 else "ranked")
    assert len(read_preference_rows(load_rows(str(out)), str(out))) == len(records)


def test_min_confidence_sends_the_unsure_to_people(tiny_models, tmp_path, one_torch_thread):
    data = write_jsonl(tmp_path / "cands.jsonl", story_pairs(6, flip_every=0) + [
        {"prompt": "two policies", "a": " the sun the sun", "b": " a big tree"}])
    # float32 on a GPU too: a random model's confidences are ~1e-5 apart, below bfloat16's grain
    args = ["--input", str(data), "--judge", str(tiny_models["gpt2"]), "--dtype", "float32"]
    everything = judge(*args, "--output", str(tmp_path / "all.jsonl"))
    confidences = sorted(r["confidence"] for r in LabelFile(tmp_path / "all.jsonl").read())
    assert everything["labels_written"] == 7 and len(set(confidences)) == 7
    bar = (confidences[2] + confidences[3]) / 2
    unsure = tmp_path / "for-people.jsonl"
    split = judge(*args, "--output", str(tmp_path / "sure.jsonl"), "--min-confidence", str(bar),
                  "--unsure", str(unsure))
    assert (split["labels_written"], split["below_min_confidence"], split["left_for_people"]) == (4, 3, 3)
    assert all(r["confidence"] >= bar for r in LabelFile(tmp_path / "sure.jsonl").read())
    items = read_items(str(unsure))  # what tether label --input reads
    assert len(items) == 3 and all(it.given is None for it in items)
    rows = [json.loads(line) for line in unsure.read_text().splitlines()]
    assert all(row["confidence"] < bar and row["reason"].startswith("confidence under") for row in rows)
    assert {it.key for it in items} == {row["item"] for row in rows}
    # the side-by-side item keeps which policy wrote which response, wherever it went
    [sbs] = [it for it in items if it.prompt == "two policies"] or [
        r for r in LabelFile(tmp_path / "sure.jsonl").read() if r["prompt"] == "two policies"]
    assert list(sbs.sources if hasattr(sbs, "sources") else sbs["sources"]) == ["a", "b"]


# ----------------------------------------------------------------------------- errors


@pytest.fixture
def pairs(tmp_path):
    return write_jsonl(tmp_path / "pairs.jsonl", story_pairs(3))


@pytest.mark.parametrize("extra, message", [
    ([], "exactly one labeler.*got none"),
    (["--judge", "x", "--reward-fn", "f.py:g"], "exactly one labeler.*--judge, --reward-fn"),
    (["--reward-fn", "f.py:g", "--template", "t.txt"], "--template .* needs --judge"),
    (["--reward-fn", "f.py:g", "--answer-tokens", "A"], "--answer-tokens must be two"),
    (["--reward-fn", "f.py:g", "--answer-tokens", "A,A"], "--answer-tokens must be two"),
    (["--reward-fn", "f.py:g", "--min-confidence", "1.5"], r"--min-confidence must be in \[0, 1\]"),
])
def test_config_errors(pairs, tmp_path, extra, message):
    with pytest.raises(ConfigError, match=message):
        load_config(JudgeConfig, ["--input", str(pairs), "--output", str(tmp_path / "o.jsonl"), *extra])


def test_output_must_not_be_the_input(pairs, tmp_path):
    with pytest.raises(ConfigError, match="--output must not be --input"):
        load_config(JudgeConfig, ["--input", str(pairs), "--output", str(pairs), "--reward-fn", "f.py:g"])
    with pytest.raises(ConfigError, match="--unsure must not be --output"):
        load_config(JudgeConfig, ["--input", str(pairs), "--output", str(tmp_path / "o.jsonl"),
                                  "--unsure", str(tmp_path / "o.jsonl"), "--reward-fn", "f.py:g"])


def test_run_errors(pairs, tiny_models, reward_fn, tmp_path):
    out = str(tmp_path / "labels.jsonl")
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"question": "q", "chosen": "a", "rejected": "b"}])
    with pytest.raises(DataError, match="bad.jsonl has no 'prompt' column"):
        judge("--input", str(bad), "--output", out, "--reward-fn", f"{reward_fn}:distinct")
    with pytest.raises(ConfigError, match="--judge .*no-such-model: no such directory"):
        judge("--input", str(pairs), "--output", out, "--judge", str(tmp_path / "no-such-model"))
    with pytest.raises(ConfigError, match="has no function 'nope'"):
        judge("--input", str(pairs), "--output", out, "--reward-fn", f"{reward_fn}:nope")
    template = tmp_path / "t.txt"
    template.write_text("{prompt}\n{response_a}\nBetter:")
    with pytest.raises(ConfigError, match=r"t\.txt lacks \{response_b\}"):
        judge("--input", str(pairs), "--output", out, "--judge", str(tiny_models["llama"]),
              "--template", str(template))
    with pytest.raises(ConfigError, match="not single tokens of the judge's tokenizer"):
        judge("--input", str(pairs), "--output", out, "--judge", str(tiny_models["llama"]))
    not_labels = write_jsonl(tmp_path / "other.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}])
    with pytest.raises(DataError, match="not a tether label record"):
        judge("--input", str(pairs), "--output", str(not_labels), "--reward-fn", f"{reward_fn}:distinct")
    assert not Path(out).exists()
