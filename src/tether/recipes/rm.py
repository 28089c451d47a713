"""`tether rm`: train a reward model (SPEC stage 2) and calibrate it.

The model is the SFT causal LM's trunk plus a linear head (N(0, 1/(d+1))) read at the last
non-padding token of prompt+response, i.e. a Hugging Face `AutoModelForSequenceClassification`
with `num_labels=1`, so the output directory loads in plain transformers.

One training unit is one prompt with its K ranked responses (a pair is K=2). All K sequences
of every prompt in a micro-batch are rows of ONE forward pass, the loss is InstructGPT's K-wise
loss (the mean over the prompt's C(K,2) ranked pairs, each prompt counting once), and the loop
normalises by the number of prompts. With --use-margin, pairs use the Bradley-Terry loss with
the margin subtracted inside the sigmoid.
"""

from __future__ import annotations

import logging
import statistics
from collections import Counter
from typing import Any, Optional, Sequence

import torch

from tether.config import RMConfig
from tether.data.io import load_rows, split_holdout
from tether.data.preference import (Group, collate_groups, read_preference_rows,
                                    read_prompt_responses, tokenize_groups)
from tether.errors import DataError
from tether.losses.reward import kwise_loss, pairwise_loss
from tether.models.load import (apply_lora, check_positions, count_parameters, fit_default_length,
                               load_tokenizer, prepare_for_training)
from tether.models.reward import (BIAS_KEY, STD_KEY, init_reward_model, scalar_head_name,
                                  score_texts, sequence_scores)
from tether.training.fsdp import is_sharded
from tether.training.launch import resolve_dtype
from tether.training.loop import LoopSpec, train_supervised
from tether.training.run import finish_run, start_run

log = logging.getLogger("tether")


# ----------------------------------------------------------------------------- loss


def group_scores(scores: torch.Tensor, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat scores (N,) -> per-group scores (G, K) and valid (G, K) bool, via slots (G, K)."""
    valid = slots >= 0
    grouped = scores[slots.clamp(min=0)] * valid
    return grouped, valid


def ranking_stats(scores: torch.Tensor, ranks: torch.Tensor, valid: torch.Tensor,
                  pair_weight: torch.Tensor, gold: Optional[torch.Tensor] = None,
                  gold_weight: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
    """Summed statistics of a batch of G groups; the loop divides them by G.

    Args (shapes): scores, ranks, valid (G, K); pair_weight, gold_weight (G,); gold (G, K).
    Returns sums over groups of:
        accuracy       correctly ordered ranked pairs x pair_weight. With the default weight
                       1/pairs-in-group this is the per-prompt mean; `pool_pair_weights` sets
                       weights that make it the accuracy over all pairs of the set (eval).
        score_gap      per-group mean of s_better - s_worse over its ranked pairs.
        accuracy_gold  (with gold) pairs ordered as the gold scores order them x gold_weight.
    A tie in scores counts as wrong.
    """
    with torch.no_grad():
        both = valid.unsqueeze(2) & valid.unsqueeze(1)
        pairs = (ranks.unsqueeze(2) < ranks.unsqueeze(1)) & both  # (G, K, K): i above j
        diff = scores.unsqueeze(2) - scores.unsqueeze(1)  # (G, K, K): s_i - s_j
        n_pairs = pairs.sum((1, 2)).clamp(min=1)
        stats = {"accuracy": ((pairs & (diff > 0)).sum((1, 2)) * pair_weight).sum(),
                 "score_gap": ((diff * pairs).sum((1, 2)) / n_pairs).sum()}
        if gold is not None and gold_weight is not None:
            gold_pairs = (gold.unsqueeze(2) > gold.unsqueeze(1)) & both
            stats["accuracy_gold"] = ((gold_pairs & (diff > 0)).sum((1, 2)) * gold_weight).sum()
    return stats


def rm_loss_sum(model: Any, batch: dict) -> tuple[torch.Tensor, dict]:
    """Loss summed over the batch's groups (the loop divides by the number of groups).

    One forward pass scores every response of every group (HF's sequence-classification head
    at the last non-pad token). Without a margin: `kwise_loss` (for K=2 exactly Bradley-Terry);
    with `batch["margin"]` (pairs only): `pairwise_loss` with the margin.
    """
    scores = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    grouped, valid = group_scores(scores[:, 0].float(), batch["slots"])
    ranks, n_groups = batch["ranks"], grouped.shape[0]
    if "margin" in batch:
        best = ranks.argmin(dim=1, keepdim=True)  # (G, 1): the chosen response of each pair
        chosen = grouped.gather(1, best).squeeze(1)
        rejected = grouped.gather(1, 1 - best).squeeze(1)
        loss, _ = pairwise_loss(chosen, rejected, batch["margin"])
    else:
        loss, _ = kwise_loss(grouped, ranks, valid)
    stats = ranking_stats(grouped, ranks, valid, batch["pair_weight"], batch.get("gold"),
                          batch.get("gold_weight"))
    return loss * n_groups, stats


def count_groups(batch: dict) -> float:
    return float(batch["slots"].shape[0])


def pool_pair_weights(groups: Sequence[Group]) -> None:
    """Weights that make `ranking_stats` sums / len(groups) the accuracies over ALL pairs of
    this set (with K=2, or fixed K without ties, the same as the per-prompt mean)."""
    n_pairs = sum(len(g.pairs()) for g in groups)
    n_gold = sum(_gold_pair_count(g) for g in groups) if all(g.gold for g in groups) else 0
    for g in groups:
        g.meta["pair_weight"] = len(groups) / max(n_pairs, 1)
        if n_gold:
            g.meta["gold_weight"] = len(groups) / n_gold


def _gold_pair_count(g: Group) -> int:
    k = len(g.gold or [])
    return sum(g.gold[i] > g.gold[j] for i in range(k) for j in range(k))


# ----------------------------------------------------------------------------- data


def load_rm_data(cfg: RMConfig, tokenizer: Any) -> tuple[list[Group], list[Group], list[dict], Counter]:
    """Train and held-out groups, the parsed train rows (for calibration) and skip counts."""
    train_ds = load_rows(cfg.data)
    eval_ds = load_rows(cfg.eval_data) if cfg.eval_data else None
    if eval_ds is None:
        train_ds, eval_ds = split_holdout(train_ds, cfg.eval_fraction, cfg.seed)
    skipped: Counter = Counter()
    rows = read_preference_rows(train_ds, cfg.data, skipped, tokenizer)
    train = tokenize_groups(rows, tokenizer, cfg.max_length, cfg.over_length, cfg.data, skipped)
    held: list[Group] = []
    if eval_ds is not None:
        source = cfg.eval_data or f"{cfg.data} (held out)"
        held_rows = read_preference_rows(eval_ds, source, tokenizer=tokenizer)
        held = tokenize_groups(held_rows, tokenizer, cfg.max_length, cfg.over_length, source)
        pool_pair_weights(held)
    if cfg.use_margin:
        for g in train + held:
            if g.margin is None or len(g.ranks) != 2:
                raise DataError(f"--use-margin needs pairs with a numeric 'margin' column; row "
                                f"{g.row + 1} of the data has none (or is a K-wise ranking)")
    return train, held, rows, skipped


def calibration_texts(cfg: RMConfig, train_rows: Sequence[dict], tokenizer: Any = None,
                      ) -> tuple[list[str], list[str], str, bool]:
    """(prompts, responses, name, chat) of the calibration set: --calibration-data
    (prompt/completion or prompt/response rows, or the best response of each preference row),
    else the best response of each training row. chat: the prompts are rendered templates."""
    if cfg.calibration_data:
        ds, name = load_rows(cfg.calibration_data), cfg.calibration_data
        cols = set(ds.column_names)
        if "completion" in cols or "response" in cols:
            prompts, responses = read_prompt_responses(ds, name)
            return prompts[:cfg.calibration_size], responses[:cfg.calibration_size], name, False
        train_rows = read_preference_rows(ds, name, tokenizer=tokenizer)
    else:
        name = f"{cfg.data} (best responses)"
    best = [(r["prompt"], r["responses"][r["ranks"].index(0)]) for r in train_rows]
    best = best[:cfg.calibration_size]
    chat = any(r.get("chat", False) for r in train_rows)  # a file is all chat rows or none
    return [p for p, _ in best], [r for _, r in best], name, chat


def calibrate(model: Any, tokenizer: Any, cfg: RMConfig, train_rows: Sequence[dict]) -> dict:
    """Mean and std of raw scores on the calibration set; bias = -mean (SPEC stage 2)."""
    prompts, responses, name, chat = calibration_texts(cfg, train_rows, tokenizer)
    raw = score_texts(model, tokenizer, prompts, responses, cfg.batch_size * 2, cfg.max_length,
                      calibrated=False, chat=chat)
    mean, std = statistics.fmean(raw), statistics.pstdev(raw)
    log.info("calibration on %s: %d responses, raw mean %.4f, std %.4f -> bias %.4f",
             name, len(raw), mean, std, -mean)
    return {"calibration/mean": mean, "calibration/std": std, "calibration/count": len(raw),
            "calibration/data": name}


# ----------------------------------------------------------------------------- margin buckets


def accuracy_by_margin(model: Any, groups: Sequence[Group], pad_id: int, batch_size: int) -> dict:
    """Held-out pair accuracy per label-strength bucket (SPEC: when labels have strengths).

    Buckets are the distinct margin values when there are at most 5, else terciles.
    Returns {"eval/accuracy_margin_<bucket>": accuracy}; {} when pairs carry no margin.
    """
    pairs = [g for g in groups if g.margin is not None and len(g.ranks) == 2]
    if not pairs:
        return {}
    correct = []
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    with torch.no_grad():
        for at in range(0, len(pairs), batch_size):
            batch = collate_groups(pairs[at:at + batch_size], pad_id)
            scores = sequence_scores(model, batch["input_ids"].to(device),
                                     batch["attention_mask"].to(device)).cpu()
            grouped, _ = group_scores(scores, batch["slots"])
            best = batch["ranks"].argmin(dim=1, keepdim=True)
            diff = grouped.gather(1, best) - grouped.gather(1, 1 - best)
            correct += (diff.squeeze(1) > 0).tolist()
    model.train(was_training)
    margins = [g.margin for g in pairs]
    values = sorted(set(margins))
    if len(values) <= 5:
        labels = [f"{m:g}" for m in margins]
    else:
        cuts = statistics.quantiles(margins, n=3)
        labels = [("low", "mid", "high")[sum(m > c for c in cuts)] for m in margins]
    out = {}
    for label in sorted(set(labels)):
        hits = [c for c, lab in zip(correct, labels) if lab == label]
        out[f"eval/accuracy_margin_{label}"] = sum(hits) / len(hits)
    return out


# ----------------------------------------------------------------------------- run


def build_model(cfg: RMConfig, pad_token_id: int) -> Any:
    """The SFT trunk with a fresh head; pad id set so HF's pooling finds the last real token."""
    model = init_reward_model(cfg.model, resolve_dtype(cfg.dtype), cfg.trust_remote_code,
                              pad_token_id, seed=cfg.seed)
    if getattr(model.config, "pad_token_id", None) != pad_token_id:
        log.info("setting the model's pad_token_id to the tokenizer's (%s -> %d)",
                 getattr(model.config, "pad_token_id", None), pad_token_id)
        model.config.pad_token_id = pad_token_id
    prepare_for_training(model, cfg.gradient_checkpointing)
    if cfg.lora_r > 0:
        model = apply_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout,
                           cfg.lora_target_modules, task_type="SEQ_CLS",
                           modules_to_save=[scalar_head_name(model)])
    return model


def run(cfg: RMConfig) -> dict:
    """Train, evaluate, calibrate and save the reward model into cfg.output_dir."""
    # 1. runtime and run directory
    accelerator, out = start_run(cfg)
    cfg = fit_default_length(cfg, "max_length", cfg.model)  # a short learned position table
    # 2. tokenizer and preference groups (pairs are groups of 2)
    tokenizer = load_tokenizer(cfg.model, cfg.trust_remote_code)
    train, held, train_rows, skipped = load_rm_data(cfg, tokenizer)
    log.info("rm: %d train / %d eval prompts, %d train pairs", len(train), len(held),
             sum(len(g.pairs()) for g in train))
    # 3. model: SFT trunk + N(0, 1/(d+1)) head (LoRA with the head trained in full)
    model = build_model(cfg, tokenizer.pad_token_id)
    check_positions(model, max((len(g.prompt_ids) + len(r) for g in train + held for r in g.response_ids),
                               default=0),
                    "the preference data", f"lower --max-length (now {cfg.max_length})", cfg.model)
    log.info("model: %s, %.2fM parameters", cfg.model, count_parameters(model) / 1e6)
    # 4. the shared loop; one unit = one prompt group, weight = number of groups
    pad = tokenizer.pad_token_id
    collate = lambda groups: collate_groups(groups, pad, with_margin=cfg.use_margin)  # noqa: E731
    spec = LoopSpec("rm", model, train, held or None, collate, rm_loss_sum, count_groups,
                    eval_hook=lambda m: accuracy_by_margin(m, held, pad, cfg.batch_size),
                    bar_keys=("loss", "accuracy"))
    result = train_supervised(cfg, accelerator, spec)
    # 5. calibrate, then the output directory becomes the final model
    summary = {"steps": result.step, "train_seconds": round(result.train_seconds, 2),
               "train_groups": len(train), "eval_groups": len(held),
               **{f"data/{k}": v for k, v in skipped.items()}, **result.final_eval}
    updates = None
    sharded = is_sharded(result.model)  # then every forward is a collective: all processes score
    if accelerator.is_main_process or sharded:
        summary.update(calibrate(result.model, tokenizer, cfg, train_rows))
        updates = {BIAS_KEY: -summary["calibration/mean"], STD_KEY: summary["calibration/std"]}
    return finish_run(accelerator, result.model, tokenizer, out, "rm", summary, cfg.merge_lora, updates)
