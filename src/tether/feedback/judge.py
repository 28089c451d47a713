"""Judges: label items (feedback/items.py) with a language model, a reward model or a function
instead of a person (RLAIF).

Every judge reduces an item of K responses to a probability for each pair, p(i better than j),
and the same pure functions turn those into ranks and a confidence:

    LM judge        the judge reads a prompt template holding the prompt and two responses and
                    ends where its answer goes ("Better response:"). p(A) is the softmax over the
                    logits of the two answer tokens alone (" A" and " B"), read at the next
                    position: no text is generated or parsed. LMs prefer a side (often the first)
                    whatever is on it, so every pair is read in both orders and
                        p(x better) = (p_A(x, y) + 1 - p_A(y, x)) / 2
                    A judge that always answers A comes out at 0.5 on every pair: a tie.
    reward model    p(x better) = sigmoid(r(x) - r(y)) (Bradley-Terry); each response is scored
                    alone, so there is no position to correct for.
    function        the higher score wins with p = 1, equal scores tie (p = 0.5): the labels
                    follow the function's order exactly, whatever scale its scores are on.

A conversational item (its prompt a list of messages) is read as the online stages' reward model
reads a conversation: rendered in the judge's own chat template, each response as the
assistant's turn (`data.preference.render_for_scoring`); the LM judge's {prompt} then holds the
rendered conversation up to the assistant's turn. A function gets TRL's conversational form.

Ranks: each response's mean win probability over the others, ranked highest first, densely
(0, 1, 2, ... without gaps); values within TIE_TOLERANCE share a rank. Score judges rank by the
scores themselves (exact ties only), which is the same order.

Confidence, in [0, 1]: for K = 2, |2p - 1|. For K > 2, the weakest link of the ranking: the
smallest 2p - 1 over neighbouring responses in it (p that the one ranked higher beats the next;
0 where the pairwise probability contradicts the ranking), and 0 when any two responses share a
rank. A tie (all ranks equal) has confidence 0.
"""

from __future__ import annotations

import copy
import inspect
import itertools
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import torch

from tether.errors import ConfigError, TetherError
from tether.feedback.items import Item
from tether.models.load import stated_positions
from tether.rollout.reward_fns import awaited

TIE_TOLERANCE = 1e-9

PLACEHOLDERS = ("prompt", "response_a", "response_b")

DEFAULT_TEMPLATE = """Two assistants answered the same prompt. Which response is better: more helpful, \
correct and clear? Ignore which one comes first, and do not prefer a response for its length.

Prompt:
{prompt}

Response A:
{response_a}

Response B:
{response_b}

Answer A or B.
Better response:"""


# ----------------------------------------------------------------------------- verdicts (pure)


@dataclass(frozen=True)
class Verdict:
    """A judge's label for one item: ranks in the item's response order (0 = best)."""

    ranks: tuple[int, ...]
    confidence: float
    wins: tuple[float, ...]  # each response's mean probability of beating the others

    @property
    def decision(self) -> str:
        if len(set(self.ranks)) == 1:
            return "tie"
        return "chose" if len(self.ranks) == 2 else "ranked"


@dataclass(frozen=True)
class Unjudged:
    """An item the judge could not label (a function returned None, the input was too long)."""

    reason: str


Outcome = Union[Verdict, Unjudged]


def combine_orders(p_a_first: float, p_a_second: float) -> float:
    """p(x better than y) from the two readings of one pair: `p_a_first` = p(answer A) with x
    shown as A, `p_a_second` = p(answer A) with y shown as A. Written as 0.5 + half the
    difference so that equal readings (a judge that only sees the side) give exactly 0.5."""
    return 0.5 + (p_a_first - p_a_second) / 2


def pair_confidence(p: float) -> float:
    """|2p - 1|: 0 for a coin flip, 1 for certainty either way."""
    return abs(2 * p - 1)


def _p(better: dict[tuple[int, int], float], i: int, j: int) -> float:
    """p(i better than j) from a table keyed by (i, j) with i < j."""
    return better[(i, j)] if i < j else 1 - better[(j, i)]


def dense_ranks(values: Sequence[float], tolerance: float = 0.0) -> list[int]:
    """Ranks 0, 1, 2, ... without gaps, highest value first; values within `tolerance` of the
    previous one (in descending order) share its rank."""
    order = sorted(range(len(values)), key=lambda i: -values[i])
    ranks = [0] * len(values)
    rank = 0
    for prev, cur in zip(order, order[1:]):
        if values[prev] - values[cur] > tolerance:
            rank += 1
        ranks[cur] = rank
    return ranks


def ranking_confidence(ranks: Sequence[int], better: dict[tuple[int, int], float]) -> float:
    """The weakest link of a ranking (module docstring): 0 when two responses share a rank."""
    if len(set(ranks)) < len(ranks):
        return 0.0
    order = sorted(range(len(ranks)), key=ranks.__getitem__)
    return min(max(0.0, 2 * _p(better, hi, lo) - 1) for hi, lo in zip(order, order[1:]))


def win_probabilities(k: int, better: dict[tuple[int, int], float]) -> list[float]:
    """Each response's mean probability of beating each of the other k - 1."""
    return [sum(_p(better, i, j) for j in range(k) if j != i) / (k - 1) for i in range(k)]


def verdict_from_pairwise(k: int, better: dict[tuple[int, int], float]) -> Verdict:
    """Ranks and confidence from p(i better than j) for every pair i < j of k responses."""
    missing = [pair for pair in itertools.combinations(range(k), 2) if pair not in better]
    if missing:
        raise ValueError(f"no probability for the pair(s) {missing}")
    wins = win_probabilities(k, better)
    ranks = dense_ranks(wins, TIE_TOLERANCE)
    return Verdict(tuple(ranks), ranking_confidence(ranks, better), tuple(wins))


def verdict_from_scores(scores: Sequence[float], bradley_terry: bool) -> Verdict:
    """A verdict from one score per response: ranked by the scores (equal scores tie), with
    p(i better than j) = sigmoid(s_i - s_j) when `bradley_terry` (a reward model), else 1, 0.5
    or 0 as s_i is above, equal to or below s_j (a function: its scale means nothing here)."""
    def p(a: float, b: float) -> float:
        if bradley_terry:
            return 1 / (1 + math.exp(-(a - b))) if a >= b else math.exp(a - b) / (1 + math.exp(a - b))
        return 1.0 if a > b else 0.0 if a < b else 0.5

    k = len(scores)
    better = {(i, j): p(scores[i], scores[j]) for i, j in itertools.combinations(range(k), 2)}
    ranks = dense_ranks(scores)
    return Verdict(tuple(ranks), ranking_confidence(ranks, better), tuple(win_probabilities(k, better)))


# ----------------------------------------------------------------------------- LM judge


def render(template: str, prompt: str, response_a: str, response_b: str) -> str:
    """The template with its placeholders filled in one pass (a placeholder written inside a
    response is left as it is; other braces in the template are kept literally). The texts are
    stripped of surrounding whitespace, which only marks where a response began."""
    values = {"prompt": prompt.strip(), "response_a": response_a.strip(), "response_b": response_b.strip()}
    return re.sub(r"\{(prompt|response_a|response_b)\}", lambda m: values[m.group(1)], template)


def check_template(template: str, where: str = "the template") -> str:
    """`template` when it holds every placeholder, else ConfigError naming the missing ones."""
    missing = [f"{{{name}}}" for name in PLACEHOLDERS if f"{{{name}}}" not in template]
    if missing:
        raise ConfigError(f"{where} lacks {', '.join(missing)}: a judge template must hold "
                          "{prompt}, {response_a} and {response_b} (see docs/judge.md)")
    return template


def read_template(path: str) -> str:
    """A template file, the newlines at its end dropped: the answer token follows its last
    character, as it follows 'Better response:' in the default."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--template {path}: no such file")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"--template {path} is not UTF-8 text") from None
    return check_template(text.rstrip("\r\n"), f"--template {path}")


def answer_token_ids(tokenizer: Any, answers: Sequence[str] = ("A", "B")) -> tuple[int, int]:
    """The token ids of the two answers as the judge would write them next: with a leading space
    (" A", GPT-2 style) when both are single tokens so, else without ("A"; SentencePiece
    tokenizers put the space marker on the piece themselves, "▁A"). ConfigError when neither
    spelling gives one token per answer, or both answers the same token."""
    tried = []
    for variant in ([" " + a for a in answers], list(answers)):
        ids = [tokenizer(a, add_special_tokens=False)["input_ids"] for a in variant]
        tried.append(", ".join(f"{a!r} -> {len(i)} tokens" for a, i in zip(variant, ids)))
        if all(len(i) == 1 for i in ids) and ids[0][0] != ids[1][0]:
            return ids[0][0], ids[1][0]
    raise ConfigError(f"the answers {', '.join(map(repr, answers))} are not single tokens of the judge's "
                      f"tokenizer ({'; '.join(tried)}); give --answer-tokens two answers that are, "
                      "and a --template that asks for them")


def model_max_length(model: Any) -> int:
    """The longest input the model's config states (0 when it states none)."""
    keys = ("max_position_embeddings", "n_positions", "seq_length")
    stated = stated_positions(getattr(model, "config", None), keys)
    return stated[0] if stated is not None else 0


def _takes(model: Any, keyword: str) -> bool:
    import inspect

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return keyword in inspect.signature(inner.forward).parameters


@torch.no_grad()
def answer_probabilities(model: Any, seqs: Sequence[list[int]], answer_ids: tuple[int, int],
                         pad_id: int, batch_size: int = 16) -> list[float]:
    """p(first answer) = softmax over the two answer logits at the position after each sequence
    (token ids, no padding), in input order. Batches are left-padded, with positions counted
    over real tokens, so a sequence gets the same probability in any batch; they are formed
    from length-sorted sequences so little compute goes to padding."""
    from tether.models.tail import reading_last
    from tether.rollout.generate import left_pad
    from tether.rollout.types import position_ids_from_mask

    device = next(model.parameters()).device
    keep = {"logits_to_keep": 1} if _takes(model, "logits_to_keep") else {}  # the LM head on one position
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    out = [0.0] * len(seqs)
    was_training = model.training
    model.eval()
    try:
        for at in range(0, len(order), batch_size):
            chunk = order[at:at + batch_size]
            ids, mask = left_pad([seqs[i] for i in chunk], pad_id, device)
            with reading_last(model, 1):
                logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                               use_cache=False, **keep).logits[:, -1, :].float()
            p_first = torch.sigmoid(logits[:, answer_ids[0]] - logits[:, answer_ids[1]])
            for i, value in zip(chunk, p_first.tolist()):
                out[i] = value
    finally:
        model.train(was_training)
    return out


class LMJudge:
    """A causal LM asked, for every pair of an item's responses in both orders, which is better."""

    def __init__(self, model: Any, tokenizer: Any, rater: str, template: str = DEFAULT_TEMPLATE,
                 answers: Sequence[str] = ("A", "B"), batch_size: int = 16, max_length: int = 0):
        from tether.models.load import pad_id

        self.model, self.tokenizer, self.rater = model, tokenizer, rater
        self.template = check_template(template)
        self.answer_ids = answer_token_ids(tokenizer, answers)
        self.batch_size = batch_size
        self.max_length = max_length or model_max_length(model)
        self.pad_id = pad_id(tokenizer, tokenizer.eos_token_id or 0)

    def encode(self, item: Item) -> dict[tuple[int, int], list[int]]:
        """(i, j) -> the judge's input with response i shown as A and j as B, for i != j (a
        conversation rendered in the judge's chat template first)."""
        from tether.data.preference import render_for_scoring
        from tether.data.tokenize import encode_prompt

        prompt, responses, _ = render_for_scoring(self.tokenizer, item.prompt, item.responses,
                                                  where=item.where)
        return {(i, j): encode_prompt(self.tokenizer, render(self.template, prompt,
                                                             responses[i], responses[j]))
                for i, j in itertools.permutations(range(item.k), 2)}

    def __call__(self, items: Sequence[Item]) -> list[Outcome]:
        encoded = [self.encode(it) for it in items]
        too_long = [bool(self.max_length) and max(len(s) for s in e.values()) > self.max_length
                    for e in encoded]
        keys = [(n, pair) for n, e in enumerate(encoded) if not too_long[n] for pair in e]
        probs = answer_probabilities(self.model, [encoded[n][pair] for n, pair in keys],
                                     self.answer_ids, self.pad_id, self.batch_size)
        p_a = {key: p for key, p in zip(keys, probs)}
        out: list[Outcome] = []
        for n, item in enumerate(items):
            if too_long[n]:
                out.append(Unjudged(f"longer than {self.max_length} tokens"))
                continue
            better = {(i, j): combine_orders(p_a[(n, (i, j))], p_a[(n, (j, i))])
                      for i, j in itertools.combinations(range(item.k), 2)}
            out.append(verdict_from_pairwise(item.k, better))
        return out


# ----------------------------------------------------------------------------- score judges


class RewardModelJudge:
    """A reward model: each response scored alone, p(x better) = sigmoid(r(x) - r(y))."""

    def __init__(self, model: Any, tokenizer: Any, rater: str, batch_size: int = 16,
                 max_length: int = 0):
        self.model, self.tokenizer, self.rater = model, tokenizer, rater
        self.batch_size, self.max_length = batch_size, max_length or None

    def __call__(self, items: Sequence[Item]) -> list[Outcome]:
        from tether.models.reward import score_texts

        prompts = [it.prompt for it in items for _ in it.responses]
        responses = [r for it in items for r in it.responses]
        scores = score_texts(self.model, self.tokenizer, prompts, responses, self.batch_size,
                             max_length=self.max_length)
        out: list[Outcome] = []
        at = 0
        for it in items:
            out.append(verdict_from_scores(scores[at:at + it.k], bradley_terry=True))
            at += it.k
        return out


def check_scores(values: Any, n: int, spec: str, where: Sequence[str]) -> list[Optional[float]]:
    """A function's return value as n floats or None; TetherError naming the function and the
    item (`where[i]` names the item of the i-th completion) otherwise."""
    from tether.rollout.reward_fns import checked_values

    return checked_values(values, n, f"--reward-fn {spec}", where, TetherError)


class FunctionJudge:
    """A Python reward function (tether grpo's signature, called without extra columns; an
    `async def` one is awaited; conversational items in TRL's conversational form, as tether grpo
    passes them): the higher score wins; an item with a None score is left unjudged."""

    def __init__(self, fn: Callable[..., Any], spec: str, rater: str):
        self.fn, self.spec, self.rater = fn, spec, rater

    def __call__(self, items: Sequence[Item]) -> list[Outcome]:
        from tether.rollout.reward_fns import conversational

        prompts = [it.prompt for it in items for _ in it.responses]
        responses = [r for it in items for r in it.responses]
        where = [it.where for it in items for _ in it.responses]
        chats = [p if not isinstance(p, str) else None for p in prompts]
        try:
            values = self.fn(*copy.deepcopy(conversational(prompts, responses, chats)))
            if inspect.isawaitable(values):  # an `async def` function, as online training takes
                values = awaited(values)
        except Exception as err:
            raise TetherError(f"--reward-fn {self.spec} raised {type(err).__name__}: {err} (on the "
                              f"items {items[0].where} ... {items[-1].where})") from None
        scores = check_scores(values, len(responses), self.spec, where)
        out: list[Outcome] = []
        at = 0
        for it in items:
            mine = scores[at:at + it.k]
            at += it.k
            if any(s is None for s in mine):
                out.append(Unjudged("the function returned None"))
            else:
                out.append(verdict_from_scores(mine, bradley_terry=False))  # type: ignore[arg-type]
        return out


def function_rater(spec: str) -> str:
    """fn:<file.py:name> (the file's name, not its path) or fn:<module:name>."""
    target, _, name = spec.rpartition(":")
    return f"fn:{Path(target).name}:{name}" if target.endswith(".py") else f"fn:{spec}"


def model_rater(kind: str, source: str) -> str:
    """judge:<dir name> or rm:<dir name> (the last part of a path or hub id)."""
    return f"{kind}:{Path(source.rstrip('/')).name or source}"
