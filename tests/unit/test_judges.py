"""The judges of `tether judge` (feedback/judge.py): the pairwise arithmetic by hand, position
bias cancelled by reading both orders, answer tokens, templates, and batching that does not
change a probability."""

import math
from types import SimpleNamespace

import pytest
import torch

from tether.errors import ConfigError, TetherError
from tether.feedback.items import Item, item_key
from tether.feedback.judge import (DEFAULT_TEMPLATE, FunctionJudge, LMJudge, Unjudged, Verdict,
                                   answer_probabilities, answer_token_ids, check_template,
                                   combine_orders, dense_ranks, function_rater, model_rater,
                                   pair_confidence, read_template, render, verdict_from_pairwise,
                                   verdict_from_scores)


def item(prompt, *responses, given=None):
    return Item(item_key(prompt, responses), prompt, tuple(responses), (), given, f"test:{prompt}")


# ----------------------------------------------------------------------------- pure arithmetic


def test_combining_the_two_orders():
    # x as A: p(A) = 0.9; y as A: p(A) = 0.3, i.e. p(B) = 0.7 that x is better
    assert combine_orders(0.9, 0.3) == pytest.approx(0.8)
    assert pair_confidence(0.8) == pytest.approx(0.6)
    assert combine_orders(0.3, 0.9) == pytest.approx(0.2)
    assert pair_confidence(0.2) == pytest.approx(0.6)
    # a judge that reads only the side: the same p(A) whatever is shown, exactly neutral
    for p in (0.1, 0.97, 1.0, 0.0, 0.123456789):
        assert combine_orders(p, p) == 0.5
        assert pair_confidence(combine_orders(p, p)) == 0.0


def test_pair_verdicts():
    tie = verdict_from_pairwise(2, {(0, 1): 0.5})
    assert tie.ranks == (0, 0) and tie.decision == "tie" and tie.confidence == 0.0
    first = verdict_from_pairwise(2, {(0, 1): 0.8})
    assert first.ranks == (0, 1) and first.decision == "chose"
    assert first.confidence == pytest.approx(0.6) and first.wins == pytest.approx((0.8, 0.2))
    second = verdict_from_pairwise(2, {(0, 1): 0.1})
    assert second.ranks == (1, 0) and second.confidence == pytest.approx(0.8)


def test_three_responses_ranked_by_mean_win_probability():
    # p(0>1) = 0.3, p(0>2) = 0.6, p(1>2) = 0.9
    # wins: 0: (0.3 + 0.6) / 2 = 0.45;  1: (0.7 + 0.9) / 2 = 0.8;  2: (0.4 + 0.1) / 2 = 0.25
    v = verdict_from_pairwise(3, {(0, 1): 0.3, (0, 2): 0.6, (1, 2): 0.9})
    assert v.wins == pytest.approx((0.45, 0.8, 0.25))
    assert v.ranks == (1, 0, 2) and v.decision == "ranked"
    # neighbours in the ranking: 1 over 0 (p 0.7 -> 0.4), 0 over 2 (p 0.6 -> 0.2): the weakest
    assert v.confidence == pytest.approx(0.2)


def test_three_responses_ties_and_contradictions():
    # a cycle (0 > 1 > 2 > 0): every mean is 0.5, so nothing can be ranked
    cycle = verdict_from_pairwise(3, {(0, 1): 1.0, (1, 2): 1.0, (0, 2): 0.0})
    assert cycle.ranks == (0, 0, 0) and cycle.decision == "tie" and cycle.confidence == 0.0
    # 0 and 1 tie, both beat 2: two ranks, dense, and no confidence in the whole ranking
    partial = verdict_from_pairwise(3, {(0, 1): 0.5, (0, 2): 0.9, (1, 2): 0.9})
    assert partial.ranks == (0, 0, 1) and partial.decision == "ranked" and partial.confidence == 0.0
    # wins 0.7, 0.55, 0.25 rank 0 over 1, but p(0>1) = 0.4 says otherwise: that link counts 0
    odd = verdict_from_pairwise(3, {(0, 1): 0.4, (0, 2): 1.0, (1, 2): 0.5})
    assert odd.ranks == (0, 1, 2) and odd.confidence == 0.0
    with pytest.raises(ValueError, match=r"\(1, 2\)"):
        verdict_from_pairwise(3, {(0, 1): 0.4, (0, 2): 1.0})


def test_dense_ranks():
    assert dense_ranks([0.3, 0.9, 0.3, 0.1]) == [1, 0, 1, 2]
    assert dense_ranks([1.0, 1.0 - 1e-12], tolerance=1e-9) == [0, 0]
    assert dense_ranks([1.0, 1.0 - 1e-12]) == [0, 1]


def test_score_verdicts_follow_the_scores_exactly():
    fn = verdict_from_scores([1.0, 3.0, 2.0], bradley_terry=False)
    assert fn.ranks == (2, 0, 1) and fn.confidence == 1.0 and fn.decision == "ranked"
    tiny = verdict_from_scores([1e-12, 0.0], bradley_terry=False)  # any difference decides
    assert tiny.ranks == (0, 1) and tiny.confidence == 1.0
    same = verdict_from_scores([2.5, 2.5], bradley_terry=False)
    assert same.decision == "tie" and same.confidence == 0.0
    some_tied = verdict_from_scores([1.0, 1.0, 0.0], bradley_terry=False)
    assert some_tied.ranks == (0, 0, 1) and some_tied.confidence == 0.0
    bt = verdict_from_scores([0.0, 2.0], bradley_terry=True)
    assert bt.ranks == (1, 0)
    assert bt.confidence == pytest.approx(math.tanh(1.0))  # |2 sigmoid(2) - 1|
    assert bt.wins[1] == pytest.approx(1 / (1 + math.exp(-2)))
    far = verdict_from_scores([-800.0, 800.0], bradley_terry=True)  # no overflow
    assert far.ranks == (1, 0) and far.confidence == 1.0


# ----------------------------------------------------------------------------- templates, tokens


def test_render_fills_each_placeholder_once():
    text = render("P={prompt} A={response_a} B={response_b} {other} {{x}}", " hi ",
                  " says {response_b}", "two\n")
    assert text == "P=hi A=says {response_b} B=two {other} {{x}}"
    assert DEFAULT_TEMPLATE.endswith("Better response:")
    assert check_template(DEFAULT_TEMPLATE) == DEFAULT_TEMPLATE


def test_template_checks(tmp_path):
    with pytest.raises(ConfigError, match=r"\{response_b\}"):
        check_template("{prompt} {response_a}")
    path = tmp_path / "t.txt"
    path.write_text("Q: {prompt}\n1: {response_a}\n2: {response_b}\nWinner:\n")
    assert read_template(str(path)) == "Q: {prompt}\n1: {response_a}\n2: {response_b}\nWinner:"
    path.write_text("Q: {prompt}\n{response_a} vs {answer_b}\n")
    with pytest.raises(ConfigError, match=r"t\.txt lacks \{response_b\}"):
        read_template(str(path))
    with pytest.raises(ConfigError, match="no such file"):
        read_template(str(tmp_path / "nope.txt"))


class WordTokenizer:
    """Splits on spaces and keeps each space on the next word, as GPT-2 does."""

    def __init__(self, vocab):
        self.vocab = vocab

    def __call__(self, text, add_special_tokens=False):
        import re

        return {"input_ids": [self.vocab.setdefault(w, len(self.vocab)) for w in re.findall(r" ?[^ ]+| ", text)]}


def test_answer_tokens_prefer_the_spaced_single_token():
    tok = WordTokenizer({" A": 7, " B": 8, "A": 1, "B": 2})
    assert answer_token_ids(tok) == (7, 8)
    assert answer_token_ids(tok, ("B", "A")) == (8, 7)


def test_answer_tokens_of_the_tiny_tokenizers(tiny_models):
    from tether.models.load import load_tokenizer

    gpt2 = load_tokenizer(str(tiny_models["gpt2"]))
    a, b = answer_token_ids(gpt2)  # " A" is two tokens there ("Ġ", "A"), so the bare letters
    assert gpt2.convert_ids_to_tokens([a, b]) == ["A", "B"]
    llama = load_tokenizer(str(tiny_models["llama"]))
    a, b = answer_token_ids(llama, ("a", "b"))
    assert llama.convert_ids_to_tokens([a, b]) == ["▁a", "▁b"]
    with pytest.raises(ConfigError, match=r"not single tokens.*'B' -> 2 tokens.*--answer-tokens"):
        answer_token_ids(llama)  # its vocabulary has "▁A" but no "▁B"


def test_rater_names():
    assert function_rater("/x/y/rewards.py:exact") == "fn:rewards.py:exact"
    assert function_rater("pkg.mod:score") == "fn:pkg.mod:score"
    assert model_rater("judge", "/runs/judge-7b/") == "judge:judge-7b"
    assert model_rater("rm", "org/reward") == "rm:reward"


# ----------------------------------------------------------------------------- the LM judge


@pytest.fixture(scope="module")
def gpt2(tiny_models, one_torch_thread):
    from tether.models.load import load_causal_lm, load_tokenizer

    tok = load_tokenizer(str(tiny_models["gpt2"]), padding_side="left")
    return load_causal_lm(str(tiny_models["gpt2"])).eval(), tok


PAIRS = [item("the cat", " sat on the mat", " ran ran ran"),
         item("once upon a time", " a dog", " there was a little girl named lily who played"),
         item("a", " yes", " no", " the sun and the tree")]


def test_a_judge_that_always_answers_a_is_neutral(gpt2):
    """The tiny GPT-2 with its LM head rigged: the A logit is 4 and the B logit 0 at every
    position, whatever it reads. Both orders then give p(A) = sigmoid(4); combined, 0.5."""
    model, tok = gpt2
    a, b = answer_token_ids(tok)

    def always_a(module, inputs, output):
        output = output.clone()
        output[..., a], output[..., b] = 4.0, 0.0
        return output

    handle = model.lm_head.register_forward_hook(always_a)
    try:
        judge = LMJudge(model, tok, "judge:rigged", batch_size=4)
        seqs = list(judge.encode(PAIRS[0]).values())
        assert answer_probabilities(model, seqs, (a, b), judge.pad_id) == pytest.approx([1 / (1 + math.exp(-4))] * 2)
        verdicts = judge(PAIRS)
    finally:
        handle.remove()
    for v, it in zip(verdicts, PAIRS):
        assert isinstance(v, Verdict)
        assert v.ranks == (0,) * it.k and v.decision == "tie" and v.confidence == 0.0
        assert v.wins == (0.5,) * it.k


class SideJudge(torch.nn.Module):
    """A stand-in judge LM: it likes the response holding the token `good` (+2 on that side's
    answer logit) and the first side anyway (+1 on A). The template puts `sep` between A and B."""

    def __init__(self, vocab, answers, good, sep):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.vocab, self.answers, self.good, self.sep = vocab, answers, good, sep

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=False, **kwargs):
        logits = torch.zeros(*input_ids.shape, self.vocab)
        for row, ids in enumerate(input_ids.tolist()):
            cut = ids.index(self.sep)
            good_on_a = self.good in ids[:cut]
            logits[row, -1, self.answers[0]] = 1.0 + (2.0 if good_on_a else 0.0)
            logits[row, -1, self.answers[1]] = 0.0 if good_on_a else 2.0
        return SimpleNamespace(logits=logits)


def test_a_real_preference_survives_both_orders(gpt2):
    _, tok = gpt2
    answers = answer_token_ids(tok)  # the template below has no spaces: "which:dog|cat->"
    good, sep = tok("cat", add_special_tokens=False)["input_ids"], tok("|", add_special_tokens=False)["input_ids"]
    assert len(good) == 1 and len(sep) == 1
    fake = SideJudge(len(tok), answers, good[0], sep[0])
    judge = LMJudge(fake, tok, "judge:fake", template="{prompt}:{response_a}|{response_b}->")
    [v] = judge([item("which", "dog", "cat")])
    # cat as B: p(A) = sigmoid(1 - 2); cat as A: p(A) = sigmoid(3)
    sig = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
    p_cat = combine_orders(sig(3.0), sig(-1.0))
    assert v.ranks == (1, 0) and v.decision == "chose"
    assert v.wins[1] == pytest.approx(p_cat) and v.confidence == pytest.approx(2 * p_cat - 1)
    assert v.confidence > 0.5


def test_batching_and_padding_leave_probabilities_unchanged(gpt2):
    """Left padding with positions counted over real tokens: GPT-2's absolute positions would
    shift otherwise, and a sequence's p(A) would depend on its batch."""
    model, tok = gpt2
    judge = LMJudge(model, tok, "judge:gpt2")
    seqs = [s for it in PAIRS for s in judge.encode(it).values()]
    assert len({len(s) for s in seqs}) > 3  # lengths differ: real padding
    one = answer_probabilities(model, seqs, judge.answer_ids, judge.pad_id, batch_size=1)
    many = answer_probabilities(model, seqs, judge.answer_ids, judge.pad_id, batch_size=5)
    assert many == pytest.approx(one, abs=1e-5)
    assert len(set(round(p, 6) for p in one)) > 1  # a random model: not all the same
    verdicts = judge(PAIRS)
    for v, it in zip(verdicts, PAIRS):
        assert len(v.ranks) == it.k and 0.0 <= v.confidence <= 1.0
        assert sum(v.wins) == pytest.approx(it.k / 2)  # every pair's probability counted once


def test_an_input_longer_than_the_limit_is_left_unjudged(gpt2):
    model, tok = gpt2
    judge = LMJudge(model, tok, "judge:gpt2", max_length=40)
    short = LMJudge(model, tok, "judge:gpt2", template="{prompt}{response_a}{response_b}", max_length=40)
    [long_one] = judge([PAIRS[0]])
    assert isinstance(long_one, Unjudged) and "40 tokens" in long_one.reason
    assert isinstance(short([PAIRS[0]])[0], Verdict)
    assert LMJudge(model, tok, "judge:gpt2").max_length == 256  # the model's n_positions


# ----------------------------------------------------------------------------- the function judge


def test_function_judge():
    def score(prompts, completions):
        return [None if "skip" in c else float(len(c)) for c in completions]

    judge = FunctionJudge(score, "f.py:score", "fn:f.py:score")
    out = judge([item("p", "aa", "a"), item("p", "b", "bbb", "bb"), item("p", "skip", "x"),
                 item("p", "cc", "dd")])
    assert out[0].ranks == (0, 1) and out[0].confidence == 1.0
    assert out[1].ranks == (2, 0, 1)
    assert out[2] == Unjudged("the function returned None")
    assert out[3].decision == "tie"


@pytest.mark.parametrize("fn, message", [
    (lambda p, c: 1 / 0, r"f\.py:bad raised ZeroDivisionError.*test:p"),
    (lambda p, c: [1.0], r"returned 1 value\(s\) for 2 completions"),
    (lambda p, c: [1.0, "x"], r"returned 'x' for test:p"),
    (lambda p, c: [1.0, float("nan")], r"returned nan for test:p: scores must be finite"),
    (lambda p, c: 3, r"returned int, not a list"),
])
def test_function_judge_errors_name_the_function_and_item(fn, message):
    with pytest.raises(TetherError, match=message):
        FunctionJudge(fn, "f.py:bad", "fn:f.py:bad")([item("p", "a", "b")])
