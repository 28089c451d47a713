"""`tether score`: score responses with a reward model and write them as JSON lines.

Input rows, by columns:
- `{prompt, response}` or `{prompt, completion}`: adds `score` (calibrated) and `raw_score` (a
  prompt of role/content messages is read in the reward model's chat template);
- pairs or hh-rlhf dialogues: adds `score_chosen`, `score_rejected`, `raw_score_chosen`,
  `raw_score_rejected` and `score_margin` = chosen - rejected;
- K-wise rankings: adds `scores`, `raw_scores` (one per response) and `pair_accuracy`.
Every output line is the input row plus those fields and `row`, the 0-based input row index
(preference rows that cannot be scored, e.g. hh rows without an assistant turn, are skipped
and counted in the log). Any hub reward model works (AutoModelForSequenceClassification with
num_labels=1); its calibration bias is 0 unless tether trained it.
"""

from __future__ import annotations

import logging
import statistics
from pathlib import Path
from typing import Any

import torch

from tether.config import ScoreConfig
from tether.data.io import load_rows, without_location
from tether.data.preference import (encode_for_scoring, read_preference_rows,
                                    read_prompt_responses)
from tether.models.load import load_tokenizer, pad_id, within_positions
from tether.models.reward import load_reward_model, reward_bias, score_sequences, score_texts
from tether.models.save import mark_complete
from tether.training.files import write_jsonl
from tether.training.launch import resolve_dtype, setup_logging

log = logging.getLogger("tether")

__all__ = ["run", "score_texts", "score_rows"]


def score_rows(model: Any, tokenizer: Any, ds: Any, source: str, batch_size: int,
               max_length: int) -> list[dict]:
    """One output dict per scorable input row (see the module docstring for the fields)."""
    bias = reward_bias(model)
    cols = set(ds.column_names)
    if "prompt" in cols and ("response" in cols or "completion" in cols):
        prompts, responses = read_prompt_responses(ds, source)
        raw = score_texts(model, tokenizer, prompts, responses, batch_size, max_length, calibrated=False)
        return [{**without_location(ds[i]), "row": i, "score": r + bias, "raw_score": r}
                for i, r in enumerate(raw)]
    rows = read_preference_rows(ds, source, tokenizer=tokenizer)
    # the responses of a row are cut to --max-length together, with one prompt context, as in
    # training, so that scoring the held-out set reproduces eval/accuracy
    seqs = [encode_for_scoring(tokenizer, r["prompt"], r["responses"], max_length, r.get("chat", False))
            for r in rows]
    pad = pad_id(tokenizer)
    raw = score_sequences(model, [s for group in seqs for s in group], pad, batch_size, calibrated=False)
    out, at = [], 0
    for r in rows:
        k = len(r["responses"])
        mine, at = raw[at:at + k], at + k
        out.append({**without_location(ds[r["row"]]), "row": r["row"],
                    **_preference_fields(r, mine, bias, cols)})
    return out


def _preference_fields(row: dict, raw: list[float], bias: float, cols: set) -> dict:
    if "chosen" in cols:  # pairs and hh-rlhf: response 0 is chosen, 1 rejected
        return {"score_chosen": raw[0] + bias, "score_rejected": raw[1] + bias,
                "raw_score_chosen": raw[0], "raw_score_rejected": raw[1],
                "score_margin": raw[0] - raw[1]}
    ranks, k = row["ranks"], len(raw)
    pairs = [(i, j) for i in range(k) for j in range(k) if ranks[i] < ranks[j]]
    correct = sum(raw[i] > raw[j] for i, j in pairs)
    return {"scores": [s + bias for s in raw], "raw_scores": raw,
            "pair_accuracy": correct / len(pairs)}


def run(cfg: ScoreConfig) -> dict:
    """Load the reward model, score every row of --data and write --output."""
    setup_logging()
    # 1. reward model and tokenizer (any hub-convention RM)
    tokenizer = load_tokenizer(cfg.reward_model, cfg.trust_remote_code)
    model = load_reward_model(cfg.reward_model, resolve_dtype(cfg.dtype), cfg.trust_remote_code,
                              tokenizer.pad_token_id)
    model.to("cuda" if torch.cuda.is_available() else "cpu")
    # 2. score
    ds = load_rows(cfg.data)
    max_length = within_positions(model, cfg.max_length)
    if max_length != cfg.max_length:
        log.warning("--max-length %d is more than the reward model's learned position table holds: rows "
                    "are cut to %d tokens", cfg.max_length, max_length)
    rows = score_rows(model, tokenizer, ds, cfg.data, cfg.batch_size, max_length)
    # 3. write, and summarise
    output = Path(cfg.output or Path(cfg.output_dir) / "scores.jsonl")
    write_jsonl(output, rows)
    summary = _summary(rows)
    summary["output"] = str(output)
    if cfg.output_dir:
        mark_complete(cfg.output_dir, "score", summary)
    log.info("score: %s", summary)
    return summary


def _summary(rows: list[dict]) -> dict:
    summary: dict = {"rows": len(rows)}
    if rows and "score" in rows[0]:
        summary["score_mean"] = statistics.fmean(r["score"] for r in rows)
    elif rows and "score_margin" in rows[0]:
        summary["accuracy"] = statistics.fmean(r["score_margin"] > 0 for r in rows)
        summary["score_mean_chosen"] = statistics.fmean(r["score_chosen"] for r in rows)
    elif rows:
        summary["pair_accuracy"] = statistics.fmean(r["pair_accuracy"] for r in rows)
    return summary
