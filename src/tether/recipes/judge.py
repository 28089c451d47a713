"""`tether judge`: label preference data with an LM judge, a reward model or a function (RLAIF).

Items are judged in chunks of --batch-size; after each chunk its labels are appended to
--output and the items left for people to --unsure, so a crash loses at most one chunk. A rerun
skips every item this rater already has a label for in --output or a row for in --unsure:
that is the resume. The summary is printed, returned and written to <output>.summary.json.
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

from tether.errors import ConfigError
from tether.feedback.items import Item, item_key, read_items
from tether.feedback.judge import (DEFAULT_TEMPLATE, FunctionJudge, LMJudge, Outcome,
                                   RewardModelJudge, Verdict, answer_token_ids, function_rater,
                                   model_rater, read_template)
from tether.config import JudgeConfig
from tether.feedback.labels import LabelFile, agreement_with_given, make_record, read_appended
from tether.training.files import atomic_write_json
from tether.training.launch import resolve_dtype, setup_logging
from tether.training.progress import Progress

log = logging.getLogger("tether")


def default_rater(cfg: JudgeConfig) -> str:
    if cfg.rater:
        return cfg.rater
    if cfg.judge:
        return model_rater("judge", cfg.judge)
    if cfg.reward_model:
        return model_rater("rm", cfg.reward_model)
    return function_rater(cfg.reward_fn)


def check_model_dir(flag: str, source: str) -> None:
    """A ConfigError now, rather than a hub lookup's, when `source` is meant as a local
    directory and is not one."""
    from tether.data.io import looks_like_path

    path = Path(source).expanduser()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{flag} {source} is a file; give the model's directory")
    if not path.exists() and looks_like_path(source):
        raise ConfigError(f"{flag} {source}: no such directory (a hub id would read owner/name)")


def make_judge(cfg: JudgeConfig, rater: str) -> Any:
    """The labeler the config names; a model is loaded in eval mode with dropout off, on the GPU
    when there is one."""
    import torch

    from tether.models.load import disable_dropout, load_tokenizer

    if cfg.reward_fn:
        from tether.rollout.reward_fns import load_reward_fn

        return FunctionJudge(load_reward_fn(cfg.reward_fn), cfg.reward_fn, rater)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = resolve_dtype(cfg.dtype)
    if cfg.reward_model:
        from tether.models.reward import load_reward_model

        check_model_dir("--reward-model", cfg.reward_model)
        tok = load_tokenizer(cfg.reward_model, cfg.trust_remote_code)
        model = load_reward_model(cfg.reward_model, dtype, cfg.trust_remote_code, tok.pad_token_id)
        disable_dropout(model)
        return RewardModelJudge(model.eval().to(device), tok, rater, cfg.batch_size, cfg.max_length)
    return load_lm_judge(cfg.judge, cfg.template, cfg.answers, dtype, cfg.trust_remote_code, device, rater,
                         cfg.batch_size, cfg.max_length)


def load_lm_judge(source: str, template_path: str, answers: Sequence[str], dtype: Any, trust_remote_code: bool,
                  device: Any, rater: str, batch_size: int, max_length: int = 0) -> LMJudge:
    """The LM judge of `--judge` (tether judge's, and online DPO's labeler): its template read
    and its answers checked against the tokenizer before the model loads; eval mode, dropout off."""
    from tether.models.load import disable_dropout, load_causal_lm, load_tokenizer

    template = read_template(template_path) if template_path else DEFAULT_TEMPLATE  # before loading
    check_model_dir("--judge", source)
    tok = load_tokenizer(source, trust_remote_code, padding_side="left")
    answer_token_ids(tok, answers)  # answers that are not single tokens: said before loading
    model = load_causal_lm(source, dtype, trust_remote_code)
    disable_dropout(model)
    return LMJudge(model.eval().to(device), tok, rater, template, answers, batch_size, max_length)


# ----------------------------------------------------------------------------- resume


def read_rows(path: str) -> list[dict]:
    """The JSON objects of the --unsure file (a cut-off last line ignored, as in a label file)."""
    return [row for _, row in read_appended(path, "not JSON; --unsure must be a file tether "
                                            "judge wrote, or a new one", ConfigError)
            if isinstance(row, dict)]


def already_judged(records: Sequence[dict], unsure_rows: Sequence[dict], rater: str) -> set[str]:
    """Keys of the items `rater` labelled (in the label file) or left for people (in the unsure
    file)."""
    done = {r["item"] for r in records if r.get("rater") == rater}
    for row in unsure_rows:
        if row.get("rater") == rater and isinstance(row.get("responses"), list):
            done.add(item_key(row.get("prompt", ""), [str(x) for x in row["responses"]]))
    return done


# ----------------------------------------------------------------------------- one chunk


def unsure_row(item: Item, rater: str, reason: str, verdict: Verdict | None = None) -> dict:
    """A candidate for people ({prompt, responses}, what tether label --input reads; a
    conversation keeps its messages), with why the judge left it; the judge's tentative ranks
    are kept as judge_ranks, never as ranks (those would be read as labels already given)."""
    row: dict = {"prompt": item.prompt, "responses": list(item.responses), "item": item.key,
                 "rater": rater, "reason": reason}
    if item.sources:
        row["sources"] = list(item.sources)
    if verdict is not None:
        row["confidence"] = verdict.confidence
        row["judge_ranks"] = list(verdict.ranks)
    return row


def sort_outcomes(items: Sequence[Item], outcomes: Sequence[Outcome], rater: str,
                  min_confidence: float) -> tuple[list[dict], list[dict], Counter]:
    """(label records, rows for people, counts) for one judged chunk. Ties, and labels whose
    confidence is under `min_confidence`, go to people."""
    records, unsure, counts = [], [], Counter()
    for item, outcome in zip(items, outcomes):
        if not isinstance(outcome, Verdict):
            counts["unjudged"] += 1
            unsure.append(unsure_row(item, rater, outcome.reason))
            continue
        counts["judged"] += 1
        decision = outcome.decision
        if decision == "tie":
            counts["ties"] += 1
            unsure.append(unsure_row(item, rater, "tie", outcome))
        elif outcome.confidence < min_confidence:
            counts["below_min_confidence"] += 1
            unsure.append(unsure_row(item, rater, f"confidence under {min_confidence:g}", outcome))
        else:
            records.append(make_record(item, outcome.ranks, rater, decision,
                                       confidence=outcome.confidence))
    return records, unsure, counts


def summary_path(output: str) -> Path:
    return Path(str(output) + ".summary.json")


def run(cfg: JudgeConfig) -> dict:
    """Judge every item not yet judged, append, summarise; returns the summary."""
    setup_logging()
    t0 = time.perf_counter()
    items = read_items(cfg.input)  # a bad input fails here, before any model loads
    rater = default_rater(cfg)
    labels, unsure = LabelFile(cfg.output), LabelFile(cfg.unsure_path)
    done = already_judged(labels.read(), read_rows(cfg.unsure_path), rater)
    todo = [it for it in items if it.key not in done]
    if len(todo) < len(items):
        log.info("%s: %d of %d items already judged by %s; judging the other %d",
                 cfg.output, len(items) - len(todo), len(items), rater, len(todo))
    counts: Counter = Counter()
    confidences: list[float] = []
    if todo:
        judge = make_judge(cfg, rater)
        bar = Progress(len(items), initial=len(items) - len(todo), desc=f"judging ({rater})",
                       enabled=cfg.progress)
        for at in range(0, len(todo), cfg.batch_size):
            chunk = todo[at:at + cfg.batch_size]
            outcomes = judge(chunk)
            records, people, chunk_counts = sort_outcomes(chunk, outcomes, rater, cfg.min_confidence)
            labels.append(records)
            unsure.append(people)
            counts.update(chunk_counts)
            counts["labels_written"] += len(records)
            counts["left_for_people"] += len(people)
            confidences += [o.confidence for o in outcomes if isinstance(o, Verdict)]
            bar.update(len(chunk), labels=counts["labels_written"], unsure=counts["left_for_people"])
        bar.close()
    if counts["unjudged"]:
        log.warning("%d item(s) could not be judged (see 'reason' in %s); they are left for people",
                    counts["unjudged"], cfg.unsure_path)
    keys = {it.key for it in items}
    mine = [r for r in labels.read() if r.get("rater") == rater and r["item"] in keys]
    summary = {"rater": rater, "input": cfg.input, "output": cfg.output, "unsure": cfg.unsure_path,
               "items": len(items), "already_judged": len(items) - len(todo),
               "judged": counts["judged"], "labels_written": counts["labels_written"],
               "ties": counts["ties"], "below_min_confidence": counts["below_min_confidence"],
               "unjudged": counts["unjudged"], "left_for_people": counts["left_for_people"],
               "mean_confidence": statistics.fmean(confidences) if confidences else None,
               "labels_by_rater_in_output": len(mine),
               "agreement_with_input": agreement_with_given(items, mine),
               "wall_seconds": round(time.perf_counter() - t0, 2)}
    atomic_write_json(summary_path(cfg.output), summary)
    print(json.dumps(summary, indent=2))
    return summary
