"""Preference data for the reward model (and DPO): pairs, hh-rlhf dialogues and K-wise rankings.

Three row formats, told apart by their columns:

- pairs    `{"prompt", "chosen", "rejected"}` (optional `margin`, `gold_chosen`, `gold_rejected`)
- hh-rlhf  `{"chosen", "rejected"}`: two whole dialogues that share a prefix. Each is split at
           its last "\\n\\nAssistant:"; the prompt is everything up to and including it.
- ranked   `{"prompt", "responses": [K], "ranks": [K]}` (optional `gold`: [K]); rank 0 is
           best, equal ranks are ties and form no pair.

Each may also be conversational, as chat models' preference data on the hub usually is: lists of
`{"role", "content"}` messages in place of strings. Either the prompt is a message list and each
response is an assistant turn (a string or a message list), or, with no prompt messages, chosen
and rejected are two whole conversations whose shared opening turns are the prompt (a string
`prompt` column beside them, as in UltraFeedback, is then ignored; beside answers alone, it is
the user's turn). These are rendered with the tokenizer's chat template, so reading them needs
the tokenizer: the prompt is the template with its generation prompt, each response is what its
turns add after that, less the closing end-of-turn (`render_chat`). A string row whose prompt
is already so rendered says so with `"chat": true` (tether iterate writes such rows), and its
prompt then gets no added special tokens either.

Every format becomes the same thing: a group of K >= 2 responses to one prompt with ranks (a
pair is a group of 2). Two layers:

    read_preference_rows(ds, source)   -> [{"prompt", "responses", "ranks", ...}]   text
    tokenize_groups(rows, tokenizer, max_length, over_length, source) -> [Group]    token ids
    load_preference_groups(source, tokenizer, max_length, over_length) -> [Group]   both

Rows that cannot teach anything are skipped, counted and logged (identical chosen and rejected,
hh dialogues without an assistant turn, groups whose responses are all tied); rows that are
malformed raise DataError naming the row.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch

from tether.data.io import load_rows, require_columns, visible_columns, without_location
from tether.data.io import where as row_location
from tether.data.tokenize import encode_chat_or_prompt, encode_prompt, encode_response
from tether.errors import DataError

log = logging.getLogger("tether")

HH_MARKER = "\n\nAssistant:"

# why a row or group was skipped -> the phrase used in the log line
SKIP_REASONS = {
    "identical": "identical chosen and rejected",
    "no_assistant": "no assistant turn to split at ('\\n\\nAssistant:' in text, role 'assistant' in messages)",
    "all_tied": "all responses tied (no pair to learn from)",
    "dropped_over_length": "longer than --max-length (dropped)",
    "truncated_to_identical": "responses identical after truncation",
    "rater_skip": "skipped by the rater (tether label / judge records with decision 'skip')",
}


# ----------------------------------------------------------------------------- text level


def detect_preference_format(ds: Any, source: str) -> str:
    """'ranked', 'pairs' or 'hh' from the column names; DataError if none fits.

    Response columns must be non-empty on every row; a prompt may be "" (but not null).
    """
    cols = set(ds.column_names)
    if "responses" in cols or "ranks" in cols:
        fmt, needed = "ranked", ["responses", "ranks"]
    elif {"chosen", "rejected"} <= cols:
        fmt, needed = ("pairs" if "prompt" in cols else "hh"), ["chosen", "rejected"]
    else:
        raise DataError(f"{source} is not preference data: expected columns prompt/chosen/rejected, "
                        "chosen/rejected (hh-rlhf dialogues) or prompt/responses/ranks; found "
                        f"columns: {', '.join(visible_columns(ds)) or '(none)'}")
    if fmt == "ranked" and "prompt" not in cols:
        require_columns(ds, ["prompt"], source)  # raises, naming the missing column
    require_columns(ds, needed, source)
    return fmt


def read_preference_rows(ds: Any, source: str, skipped: Optional[Counter] = None,
                         tokenizer: Any = None) -> list[dict]:
    """Parse any preference format into `{"prompt", "responses", "ranks", "row"}` dicts.

    `row` is the 0-based index of the source row. Optional keys: `margin` (float, pairs with a
    margin column), `gold` (list of K floats, when gold scores are given) and `chat` (True for a
    conversational row: its prompt is a rendered chat template, see `encode_chat_or_prompt`).
    Skipped rows are
    added to `skipped` (reason -> count) and logged; malformed rows raise DataError.
    Conversational rows are rendered with `tokenizer`'s chat template (required for them).
    """
    fmt = detect_preference_format(ds, source)
    counts: Counter = Counter()
    parse = {"pairs": _parse_pair, "hh": _parse_hh, "ranked": _parse_ranked}[fmt]
    rows = []
    for i, raw in enumerate(ds):
        where = row_location(source, raw, i)
        raw = without_location(raw)
        if raw.get("decision") == "skip":  # a label record the rater passed over
            counts["rater_skip"] += 1
            continue
        if _is_conversational(raw):
            raw = _render_conversational(raw, fmt, tokenizer, where)
            if isinstance(raw, str):  # a skip reason
                counts[raw] += 1
                continue
            parsed, reason = (_parse_ranked if fmt == "ranked" else _parse_pair)(raw, where)
            parsed["chat"] = True  # a rendered template: its text carries its own special tokens
        else:
            parsed, reason = parse(raw, where)
            if raw.get("chat") is True and not reason:  # rendered already, by whoever wrote it
                parsed["chat"] = True
        if reason:
            counts[reason] += 1
            continue
        parsed["row"] = i
        rows.append(parsed)
    _log_skips(source, counts, len(ds))
    if skipped is not None:
        skipped.update(counts)
    if not rows:
        reasons = "; ".join(f"{n} {SKIP_REASONS.get(k, k)}" for k, n in counts.items())
        raise DataError(f"{source}: no usable preference rows ({reasons or 'no rows'})")
    return rows


def is_messages(value: Any) -> bool:
    """A non-empty list of {"role", "content"} messages (a conversation, or TRL's
    conversational prompt)."""
    return isinstance(value, list) and bool(value) and all(
        isinstance(m, dict) and "role" in m and "content" in m for m in value)


def _is_conversational(raw: dict) -> bool:
    return any(is_messages(raw.get(k)) for k in ("prompt", "chosen", "rejected")) or (
        isinstance(raw.get("responses"), list) and any(is_messages(r) for r in raw["responses"]))


def assistant_text(value: Any) -> Any:
    """The content of a response given as one assistant message (TRL's conversational form,
    `[{"role": "assistant", "content": text}]`); any other value as it is."""
    if is_messages(value) and len(value) == 1 and value[0].get("role") == "assistant":
        return value[0]["content"]
    return value


def _turns(value: Any, column: str, where: str) -> list[dict]:
    """A response given as a string or as message(s) -> a list of messages."""
    if isinstance(value, str):
        return [{"role": "assistant", "content": value}]
    if is_messages(value):
        return list(value)
    raise DataError(f"{where}: {column!r} must be a string or a list of {{role, content}} messages")


def _split_conversations(a: list[dict], b: list[dict]) -> Optional[int]:
    """How many opening turns two whole conversations share as their prompt: the shared prefix,
    cut back to just before an assistant turn. None when there is no such point."""
    k = 0
    while k < min(len(a), len(b)) and a[k] == b[k]:
        k += 1
    while k > 0 and (k >= len(a) or a[k].get("role") != "assistant"):
        k -= 1
    if k == 0 or k >= len(b) or b[k].get("role") != "assistant":
        return None
    return k


def _render_conversational(raw: dict, fmt: str, tokenizer: Any, where: str) -> Any:
    """A conversational row -> the same row with rendered strings, or a skip reason."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{where}: conversational (role/content message) preference rows need a "
                        "tokenizer with a chat template; this one has none. Set "
                        "tokenizer.chat_template, or give prompt/chosen/rejected as plain strings.")
    if fmt == "ranked":
        if not is_messages(raw.get("prompt")):
            raise DataError(f"{where}: conversational K-wise rows need 'prompt' as a message list")
        if not isinstance(raw.get("responses"), list):
            raise DataError(f"{where}: 'responses' and 'ranks' must be lists")
        prompt = list(raw["prompt"])
        responses = [_turns(r, f"responses[{k}]", where) for k, r in enumerate(raw["responses"])]
    elif is_messages(raw.get("prompt")):
        prompt = list(raw["prompt"])
        responses = [_turns(raw["chosen"], "chosen", where), _turns(raw["rejected"], "rejected", where)]
    else:
        if not (is_messages(raw.get("chosen")) and is_messages(raw.get("rejected"))):
            raise DataError(f"{where}: with no prompt messages, 'chosen' and 'rejected' must both "
                            "be whole conversations (lists of role/content messages)")
        a, b = list(raw["chosen"]), list(raw["rejected"])
        if a == b:
            return "identical"
        if a[0].get("role") == b[0].get("role") == "assistant" and isinstance(raw.get("prompt"), str):
            prompt, responses = [{"role": "user", "content": raw["prompt"]}], [a, b]  # answers only
        else:
            k = _split_conversations(a, b)
            if k is None:
                return "no_assistant"
            prompt, responses = a[:k], [a[k:], b[k:]]
    try:
        prompt_text, responses = render_chat(tokenizer, prompt, responses)
    except ValueError as err:
        raise DataError(f"{where}: {err}; give prompt/chosen/rejected as plain strings instead") from None
    out = {**raw, "prompt": prompt_text}
    if fmt == "ranked":
        out["responses"] = responses
    else:
        out["chosen"], out["rejected"] = responses
    return out


def render_chat(tokenizer: Any, prompt: list[dict], responses: Sequence[list[dict]],
                ) -> tuple[str, list[str]]:
    """(prompt text, response texts) of a conversation, as tether's reward models read it.

    The prompt is the chat template with its generation prompt. Each response is what its turns
    add after that, without the template's closing end-of-turn: an RM reads a response up to
    its last real token, and PPO scores its rollouts without their EOS, so the two agree.
    ValueError when the template does not render the prompt as a prefix of the conversation.
    """
    render = tokenizer.apply_chat_template
    prompt_text = render(prompt, tokenize=False, add_generation_prompt=True)
    sentinel = "tether-end-of-turn-probe"
    probe = render(prompt + [{"role": "assistant", "content": sentinel}], tokenize=False)
    at = probe.find(sentinel, len(prompt_text))
    closing = probe[at + len(sentinel):] if at >= 0 else ""
    texts = []
    for turns in responses:
        full = render(prompt + list(turns), tokenize=False)
        if not full.startswith(prompt_text):
            raise ValueError("the chat template does not render the prompt as a prefix of the "
                             "whole conversation, so the response cannot be cut out")
        text = full[len(prompt_text):]
        texts.append(text[:len(text) - len(closing)] if closing and text.endswith(closing) else text)
    return prompt_text, texts


def render_for_scoring(tokenizer: Any, prompt: Any, responses: Sequence[str],
                       fallback: str | None = None, chat: bool = False,
                       where: str = "") -> tuple[str, list[str], bool]:
    """(prompt text, response texts, chat) as a reward model or LM judge with `tokenizer` reads a
    prompt and its responses.

    A conversation (a message list) is rendered in the tokenizer's own chat template, each
    response as one assistant turn (`render_chat`), and comes back with chat=True: the text
    carries its own special tokens. A tokenizer without a template reads `fallback` instead, the
    text the policy read (as online RM scoring does), with chat=False; without a fallback that is
    a DataError (naming `where`). A string prompt is read as it is, with the caller's `chat`.
    """
    at = f"{where}: " if where else ""
    if not is_messages(prompt):
        return prompt, list(responses), chat
    if getattr(tokenizer, "chat_template", None):
        try:
            text, texts = render_chat(tokenizer, list(prompt),
                                      [[{"role": "assistant", "content": r}] for r in responses])
        except ValueError as err:
            raise DataError(f"{at}{err}") from None
        return text, texts, True
    if fallback is not None:
        return fallback, list(responses), False
    raise DataError(f"{at}conversational prompts (role/content messages) are scored in the "
                    f"scorer's chat template, and the tokenizer of {tokenizer.name_or_path or 'it'} "
                    "has none. Set its tokenizer.chat_template, or give plain string prompts.")


def _log_skips(source: str, counts: Counter, total: int) -> None:
    if counts:
        detail = ", ".join(f"{n} {SKIP_REASONS.get(k, k)}" for k, n in counts.items())
        log.warning("%s: skipped %d of %d row(s): %s", source, sum(counts.values()), total, detail)


def _text(value: Any, column: str, where: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"{where}: {column!r} must be a string, got {type(value).__name__}")
    return value


def _number(value: Any, column: str, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DataError(f"{where}: {column!r} must be a number, got {value!r}")
    return float(value)


def _parse_pair(raw: dict, where: str) -> tuple[dict, Optional[str]]:
    prompt = _text(raw["prompt"], "prompt", where)
    chosen, rejected = _text(raw["chosen"], "chosen", where), _text(raw["rejected"], "rejected", where)
    if chosen == rejected:
        return {}, "identical"
    row = {"prompt": prompt, "responses": [chosen, rejected], "ranks": [0, 1]}
    return _with_pair_extras(row, raw, where), None


def _with_pair_extras(row: dict, raw: dict, where: str) -> dict:
    if raw.get("margin") is not None:
        row["margin"] = _number(raw["margin"], "margin", where)
    if raw.get("gold_chosen") is not None and raw.get("gold_rejected") is not None:
        row["gold"] = [_number(raw["gold_chosen"], "gold_chosen", where),
                       _number(raw["gold_rejected"], "gold_rejected", where)]
    return row


def split_hh_dialogue(text: str) -> Optional[tuple[str, str]]:
    """(prompt, response) split at the last "\\n\\nAssistant:" (kept in the prompt), or None."""
    at = text.rfind(HH_MARKER)
    if at < 0:
        return None
    cut = at + len(HH_MARKER)
    return text[:cut], text[cut:]


def _parse_hh(raw: dict, where: str) -> tuple[dict, Optional[str]]:
    chosen, rejected = _text(raw["chosen"], "chosen", where), _text(raw["rejected"], "rejected", where)
    if chosen == rejected:
        return {}, "identical"
    a, b = split_hh_dialogue(chosen), split_hh_dialogue(rejected)
    if a is None or b is None:
        return {}, "no_assistant"
    if a[0] != b[0]:
        # A response that itself contains "\n\nAssistant:" (a model that kept writing the
        # dialogue) moves the last marker; the real prompt is the shared prefix up to its last
        # marker, so split both there.
        shared = split_hh_dialogue(os.path.commonprefix([chosen, rejected]))
        if shared is None:
            return {}, "no_assistant"
        a = shared[0], chosen[len(shared[0]):]
        b = shared[0], rejected[len(shared[0]):]
    if a[1] == b[1]:
        return {}, "identical"
    row = {"prompt": a[0], "responses": [a[1], b[1]], "ranks": [0, 1]}
    return _with_pair_extras(row, raw, where), None


def _parse_ranked(raw: dict, where: str) -> tuple[dict, Optional[str]]:
    prompt = _text(raw["prompt"], "prompt", where)
    responses, ranks = raw["responses"], raw["ranks"]
    if not isinstance(responses, list) or not isinstance(ranks, list):
        raise DataError(f"{where}: 'responses' and 'ranks' must be lists")
    if len(responses) != len(ranks):
        raise DataError(f"{where}: {len(responses)} responses but {len(ranks)} ranks; give one "
                        "rank per response (0 = best)")
    responses = [_text(r, f"responses[{k}]", where) for k, r in enumerate(responses)]
    ranks = _check_ranks(ranks, where)
    _check_duplicates(responses, ranks, where)
    row = {"prompt": prompt, "responses": responses, "ranks": ranks}
    gold = raw.get("gold")
    if gold is not None:
        if not isinstance(gold, list) or len(gold) != len(responses):
            raise DataError(f"{where}: 'gold' must hold one score per response")
        row["gold"] = [_number(g, f"gold[{k}]", where) for k, g in enumerate(gold)]
    if len(set(ranks)) < 2:
        return {}, "all_tied"
    return row, None


def _check_ranks(ranks: list, where: str) -> list[int]:
    """Ranks are 0 (best), 1, 2, ... with equal values for ties; no rank may be absent."""
    for k, r in enumerate(ranks):
        if isinstance(r, bool) or not isinstance(r, (int, float)) or r != int(r) or r < 0:
            raise DataError(f"{where}: rank of response {k} is missing or not a non-negative "
                            f"integer ({r!r}); ranks are 0 (best), 1, 2, ...")
    ranks = [int(r) for r in ranks]
    missing = sorted(set(range(max(ranks) + 1)) - set(ranks))
    if missing:
        raise DataError(f"{where}: ranks {ranks} skip rank(s) {missing}; ranks must run 0 (best), "
                        "1, 2, ... without gaps (equal ranks mean a tie)")
    return ranks


def _check_duplicates(responses: list[str], ranks: list[int], where: str) -> None:
    """The same response text ranked twice, differently, is a contradiction in the labels."""
    first: dict[str, int] = {}
    for k, text in enumerate(responses):
        if text in first and ranks[first[text]] != ranks[k]:
            raise DataError(f"{where}: responses {first[text]} and {k} are the same text with "
                            f"different ranks ({ranks[first[text]]} and {ranks[k]})")
        first.setdefault(text, k)


def read_prompt_responses(ds: Any, source: str) -> tuple[list[Any], list[str]]:
    """Single responses to score: `{prompt, response}` or `{prompt, completion}` rows. A prompt
    may be a conversation, kept as its messages (`models.reward.score_texts` renders them), its
    response then a string or one assistant message (TRL's conversational form)."""
    column = "response" if "response" in ds.column_names else "completion"
    if "prompt" not in ds.column_names or column not in ds.column_names:
        raise DataError(f"{source}: expected columns prompt and response (or completion); found "
                        f"columns: {', '.join(visible_columns(ds)) or '(none)'}")
    prompts, responses = [], []
    for i, raw in enumerate(ds):
        where = row_location(source, raw, i)
        prompt = raw["prompt"]
        prompts.append(list(prompt) if is_messages(prompt) else _text(prompt, "prompt", where))
        responses.append(_text(assistant_text(raw[column]), column, where))
    return prompts, responses


# ----------------------------------------------------------------------------- token level


@dataclass
class Group:
    """One prompt and its K ranked responses, tokenised (a pair is a group of K=2).

    `sequences[k]` = prompt_ids + response_ids[k]: no EOS is appended, because a reward model
    reads its score at the last real token of the response.
    """

    prompt_ids: list[int]
    response_ids: list[list[int]]
    ranks: list[int]  # 0 = best; equal ranks are ties
    margin: Optional[float] = None  # pair label strength (Llama 2 style), when the data has it
    gold: Optional[list[float]] = None  # true scores (the built-in world), when known
    row: int = -1  # 0-based index of the source row
    meta: dict = field(default_factory=dict)

    @property
    def sequences(self) -> list[list[int]]:
        return [self.prompt_ids + r for r in self.response_ids]

    def pairs(self) -> list[tuple[int, int]]:
        """(better, worse) response indices for every pair with different ranks."""
        k = len(self.ranks)
        return [(i, j) for i in range(k) for j in range(k) if self.ranks[i] < self.ranks[j]]


def prompt_special_count(tokenizer: Any) -> int:
    """How many special ids (e.g. BOS) `encode_prompt` puts in front of every prompt."""
    return len(encode_prompt(tokenizer, ""))


def fit_to_length(prompt_ids: list[int], responses: Sequence[list[int]], max_length: int,
                  n_special: int) -> Optional[tuple[list[int], list[list[int]]]]:
    """Cut a group to at most `max_length` tokens per sequence, or None if nothing would remain.

    Responses lose their ends and the prompt loses its beginning (the oldest dialogue turns,
    keeping a leading BOS). Each side keeps at least half of the window when it needs it, so a
    long prompt cannot squeeze the responses, whose tokens are what the score is about, to
    nothing.
    """
    longest = max(len(r) for r in responses)
    if len(prompt_ids) + longest <= max_length:
        return prompt_ids, [list(r) for r in responses]
    response_budget = max(max_length - len(prompt_ids), min(longest, max_length // 2))
    prompt_budget = max_length - response_budget
    if response_budget < 1 or prompt_budget <= n_special:
        return None
    if len(prompt_ids) > prompt_budget:
        keep = prompt_budget - n_special
        prompt_ids = prompt_ids[:n_special] + prompt_ids[len(prompt_ids) - keep:]
    return prompt_ids, [list(r[:response_budget]) for r in responses]


def encode_for_scoring(tokenizer: Any, prompt: str, responses: Sequence[str],
                       max_length: Optional[int] = None, chat: bool = False) -> list[list[int]]:
    """prompt + response ids for each response, cut together to `max_length` as in training
    (the responses of one prompt keep the same prompt context). Nothing is ever dropped: when
    even that cannot fit, the last `max_length` tokens are kept. `chat`: the prompt is a
    rendered chat template (`encode_chat_or_prompt`)."""
    prompt_ids = encode_chat_or_prompt(tokenizer, prompt, chat)
    encoded = [encode_response(tokenizer, r) for r in responses]
    if max_length is not None and len(prompt_ids) + max(map(len, encoded)) > max_length:
        fitted = fit_to_length(prompt_ids, encoded, max_length, prompt_special_count(tokenizer))
        if fitted is None:
            return [(prompt_ids + r)[-max_length:] for r in encoded]
        prompt_ids, encoded = fitted
    return [prompt_ids + r for r in encoded]


def tokenize_groups(rows: Sequence[dict], tokenizer: Any, max_length: int, over_length: str,
                    source: str, skipped: Optional[Counter] = None) -> list[Group]:
    """Token-id groups from `read_preference_rows` output, with over-length handling counted."""
    n_special = prompt_special_count(tokenizer)
    counts: Counter = Counter()
    groups = []
    for row in rows:
        prompt_ids = encode_chat_or_prompt(tokenizer, row["prompt"], row.get("chat", False))
        responses = [encode_response(tokenizer, r) for r in row["responses"]]
        if len(prompt_ids) + max(len(r) for r in responses) > max_length:
            fitted = fit_to_length(prompt_ids, responses, max_length, n_special) \
                if over_length == "truncate" else None
            if fitted is None:
                counts["dropped_over_length"] += 1
                continue
            prompt_ids, responses = fitted
            if not _has_distinct_pair(responses, row["ranks"]):
                counts["truncated_to_identical"] += 1
                continue
            counts["truncated"] += 1
        groups.append(Group(prompt_ids, responses, list(row["ranks"]), row.get("margin"),
                            row.get("gold"), row.get("row", -1)))
    if counts:
        log.warning("%s: %d group(s) longer than --max-length %d: %d truncated, %d dropped, "
                    "%d identical after truncation (dropped)", source,
                    sum(counts.values()), max_length, counts["truncated"],
                    counts["dropped_over_length"], counts["truncated_to_identical"])
    if skipped is not None:
        skipped.update(counts)
    if not groups:
        raise DataError(f"{source}: every preference row is longer than --max-length {max_length} "
                        "(or identical after truncation); raise --max-length")
    return groups


def _has_distinct_pair(responses: Sequence[list[int]], ranks: Sequence[int]) -> bool:
    k = len(ranks)
    return any(ranks[i] < ranks[j] and responses[i] != responses[j]
               for i in range(k) for j in range(k))


def load_preference_groups(source: str, tokenizer: Any, max_length: int,
                           over_length: str = "truncate",
                           skipped: Optional[Counter] = None) -> list[Group]:
    """Read any preference format from `source` (file, saved dataset or hub id) into Groups."""
    ds = load_rows(source)
    rows = read_preference_rows(ds, source, skipped, tokenizer)
    return tokenize_groups(rows, tokenizer, max_length, over_length, source, skipped)


# ----------------------------------------------------------------------------- collation


def collate_groups(groups: Sequence[Group], pad_id: int, with_margin: bool = False,
                   ) -> dict[str, torch.Tensor]:
    """Flatten the groups' sequences into one right-padded batch for ONE forward pass.

    Returns (N = total responses, G = groups, K = most responses in a group, L = longest):
        input_ids, attention_mask   (N, L) long
        slots    (G, K) long: the row of input_ids holding response k of group g, -1 if none
        ranks    (G, K) long: 0 = best (padding slots hold 0 and are masked out by slots)
        pair_weight (G,) float: meta["pair_weight"], default 1 / (pairs in the group)
        margin   (G,) float, when with_margin
        gold (G, K) float and gold_weight (G,) float, when every group has gold scores and a
            meta["gold_weight"] (the reward-model recipe sets it on held-out groups)
    """
    seqs = [s for g in groups for s in g.sequences]
    width = max(len(s) for s in seqs)
    k_max = max(len(g.ranks) for g in groups)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for n, s in enumerate(seqs):
        ids[n, :len(s)] = torch.tensor(s, dtype=torch.long)
        mask[n, :len(s)] = 1
    slots = torch.full((len(groups), k_max), -1, dtype=torch.long)
    ranks = torch.zeros((len(groups), k_max), dtype=torch.long)
    at = 0
    for g, group in enumerate(groups):
        k = len(group.ranks)
        slots[g, :k] = torch.arange(at, at + k)
        ranks[g, :k] = torch.tensor(group.ranks)
        at += k
    pair_weight = [g.meta.get("pair_weight", 1.0 / max(len(g.pairs()), 1)) for g in groups]
    batch = {"input_ids": ids, "attention_mask": mask, "slots": slots, "ranks": ranks,
             "pair_weight": torch.tensor(pair_weight, dtype=torch.float32)}
    if with_margin:
        batch["margin"] = torch.tensor([g.margin or 0.0 for g in groups], dtype=torch.float32)
    if all(g.gold is not None and "gold_weight" in g.meta for g in groups):
        gold = torch.zeros((len(groups), k_max), dtype=torch.float32)
        for g, group in enumerate(groups):
            gold[g, :len(group.gold)] = torch.tensor(group.gold)
        batch["gold"] = gold
        batch["gold_weight"] = torch.tensor([g.meta["gold_weight"] for g in groups],
                                            dtype=torch.float32)
    return batch
