"""`tether dpo`: direct preference optimisation (SPEC, "Alternatives") and its family.

--loss sigmoid (DPO): L = -log sigmoid(beta * [(log pi(y_w) - log ref(y_w)) - (log pi(y_l) -
log ref(y_l))]), with sequence log-probabilities summed over response tokens (plus the EOS, as
in SFT); ipo, robust, conservative and hinge change the function of that margin; simpo and orpo
need no reference (docs/preference.md gives every formula and its paper). It reads the same
preference formats as `tether rm`; a K-wise group contributes each of its ranked pairs.

The reference is the starting model. Its log-probabilities over the training and eval pairs are
computed once, before the first update (under LoRA: before the adapters exist, which is the
adapter-disabled base), so no second model is held in memory while training. The
reference-free losses skip that pass, and load no reference at all.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from tether.config import DPOConfig
from tether.data.io import load_rows
from tether.data.preference import load_preference_groups, read_preference_rows
from tether.data.sft import IGNORE
from tether.losses.dpo import REFERENCE_FREE, orpo_loss, preference_loss, simpo_loss
from tether.models.load import (apply_lora, check_positions, count_parameters, disable_dropout,
                               fit_default_length, load_causal_lm, load_tokenizer, position_limit)
from tether.ops.logprobs import sequence_logprobs
from tether.training.fsdp import place
from tether.training.launch import resolve_dtype
from tether.training.loop import LoopSpec, train_supervised
from tether.training.run import finish_run, start_run

log = logging.getLogger("tether")


@dataclass
class PairUnit:
    prompt_ids: list[int]
    chosen_ids: list[int]  # response + EOS
    rejected_ids: list[int]
    ref_chosen: float = 0.0  # log ref(y_w | x), filled before training
    ref_rejected: float = 0.0


def load_pairs(source: str, tokenizer: Any, max_length: int, over_length: str) -> list[PairUnit]:
    """Every (better, worse) pair of every group, with the EOS appended to both responses."""
    eos = tokenizer.eos_token_id
    groups = load_preference_groups(source, tokenizer, max_length - 1, over_length)
    return [PairUnit(g.prompt_ids, g.response_ids[i] + [eos], g.response_ids[j] + [eos])
            for g in groups for i, j in g.pairs()]


def response_rows(rows: Sequence[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """(prompt ids, response ids) rows, right-padded: input_ids/attention_mask/labels (N, L),
    the labels IGNORE everywhere but on the response. Shared by DPO and KTO."""
    width = max(len(p) + len(r) for p, r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (p, r) in enumerate(rows):
        n = len(p) + len(r)
        ids[i, :n] = torch.tensor(p + r)
        labels[i, len(p):n] = torch.tensor(r)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def collate_pairs(units: Sequence[PairUnit], pad_id: int) -> dict[str, torch.Tensor]:
    """Chosen rows first, then rejected rows: input_ids/attention_mask/labels (2B, L)."""
    rows = [(u.prompt_ids, u.chosen_ids) for u in units] + [(u.prompt_ids, u.rejected_ids) for u in units]
    ref = torch.tensor([u.ref_chosen for u in units] + [u.ref_rejected for u in units])
    return {**response_rows(rows, pad_id), "ref_logps": ref}


def _policy_logps(model: Any, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-probabilities of each row's response, its token count)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return sequence_logprobs(logits, batch["labels"])


@torch.no_grad()
def reference_logps(model: Any, units: Sequence[Any], collate: Callable[[Sequence[Any]], dict],
                    batch_size: int) -> list[tuple[float, float]]:
    """The starting model's summed response log-probabilities of each unit's two rows (`collate`
    puts every unit's first row in the first half of the batch and its second in the second
    half), before any update: the reference of DPO and KTO without a second model."""
    model.eval()
    device, out = next(model.parameters()).device, []
    for at in range(0, len(units), batch_size):
        chunk = units[at:at + batch_size]
        batch = {k: v.to(device) for k, v in collate(chunk).items()}
        logps = _policy_logps(model, batch)[0].tolist()
        out += [(logps[i], logps[len(chunk) + i]) for i in range(len(chunk))]
    model.train()
    return out


def fill_reference_logps(model: Any, units: Sequence[PairUnit], pad_id: int, batch_size: int) -> None:
    pairs = reference_logps(model, units, lambda chunk: collate_pairs(chunk, pad_id), batch_size)
    for u, (chosen, rejected) in zip(units, pairs):
        u.ref_chosen, u.ref_rejected = chosen, rejected


# the loss functions' statistics, by the names the stage logs them under
STAT_NAMES = {"rewards/accuracy": "accuracy", "rewards/margin": "margin", "rewards/chosen": "reward_chosen",
              "rewards/rejected": "reward_rejected", "orpo/nll": "nll", "orpo/odds_ratio_loss": "odds_ratio_loss",
              "orpo/log_odds_ratio": "log_odds_ratio"}


def make_loss_fn(cfg: DPOConfig):
    """The batch's loss and statistics as sums over its pairs (what the shared loop wants; the
    loss functions give means)."""
    def loss_fn(model: Any, batch: dict) -> tuple[torch.Tensor, dict]:
        logps, counts = _policy_logps(model, batch)
        n = logps.shape[0] // 2
        mean = logps / counts.clamp(min=1)  # per-token: SimPO's and ORPO's length normalisation
        extra = {}
        if cfg.loss == "simpo":
            loss, stats = simpo_loss(mean[:n], mean[n:], cfg.loss_beta, cfg.simpo_gamma)
        elif cfg.loss == "orpo":
            loss, stats = orpo_loss(-mean[:n].mean(), mean[:n], mean[n:], cfg.orpo_lambda)
        else:
            ref = batch["ref_logps"]
            loss, stats = preference_loss(cfg.loss, logps[:n], logps[n:], ref[:n], ref[n:], cfg.loss_beta,
                                          cfg.label_smoothing)
            extra["logratio_chosen"] = (logps[:n] - ref[:n]).detach().sum()
        sums = {STAT_NAMES.get(key, key.replace("/", "_")): value * n for key, value in stats.items()}
        return loss * n, {**sums, **extra}
    return loss_fn


def _eval_prompts(cfg: DPOConfig, tokenizer: Any) -> tuple[list[str], bool]:
    """(distinct prompts, whether they are rendered chat templates) for the KL samples."""
    source = cfg.eval_data or cfg.data
    rows = read_preference_rows(load_rows(source), source, tokenizer=tokenizer)
    seen, prompts = set(), []
    for r in rows:
        if r["prompt"] not in seen:
            seen.add(r["prompt"])
            prompts.append(r["prompt"])
    return prompts[:cfg.kl_samples], any(r.get("chat", False) for r in rows)


def make_kl_hook(cfg: Any, tokenizer: Any, accelerator: Any,
                 eval_prompts: Callable[[], tuple[list[str], bool]], reference_free: bool = False):
    """After training: KL(policy || reference) on responses sampled from the policy to
    `eval_prompts()` (prompts, whether they are rendered chat templates), under --fsdp from the
    sharded policy, and the reference sharded too. Shared by DPO and KTO."""
    def hook(model: Any) -> dict:
        if cfg.kl_samples <= 0 or reference_free:  # no reference is ever loaded
            return {}
        from tether.eval.sampling import kl_to_reference, sample_responses

        reference = load_causal_lm(cfg.model, resolve_dtype(cfg.dtype), cfg.trust_remote_code)
        disable_dropout(reference)
        reference.eval().requires_grad_(False)
        place(reference, accelerator, cfg.fsdp)
        was_training = model.training
        model.eval()
        prompts, chat = eval_prompts()
        samples = sample_responses(model, tokenizer, prompts, n=1, chat=chat,
                                   max_new_tokens=cfg.kl_response_length, seed=cfg.seed)
        kl = kl_to_reference(model, reference, tokenizer, samples)
        model.train(was_training)
        return {"eval/kl_ref": kl}
    return hook


def split_off(units: list, fraction: float, seed: int, least: int = 1) -> tuple[list, list]:
    """(train, held out): a seeded random `fraction` of the units (at least `least`) held out,
    when there are more than `least` of them and fraction > 0; else (units, []). DPO and KTO."""
    if fraction <= 0 or len(units) <= least:
        return units, []
    n_eval = max(least, int(len(units) * fraction))
    order = torch.randperm(len(units), generator=torch.Generator().manual_seed(seed)).tolist()
    return [units[i] for i in order[n_eval:]], [units[i] for i in order[:n_eval]]


def fit_kl_samples(cfg: Any, model: Any) -> Any:
    """The KL samples after training must fit a learned position table too: a default
    --kl-response-length shrinks to half of it, a given one that does not fit is refused."""
    table = position_limit(model)
    if cfg.kl_samples <= 0 or table is None:
        return cfg
    cfg = fit_default_length(cfg, "kl_response_length", cfg.model, table[0] // 2, "the prompts", table)
    check_positions(model, cfg.kl_response_length + 1, "the KL samples (--kl-response-length, and a "
                    "prompt token)", "lower --kl-response-length, or set --kl-samples 0", cfg.model)
    return cfg


def run(cfg: DPOConfig) -> dict:
    """Train with DPO and save the policy into cfg.output_dir; returns the summary."""
    # 1. runtime and run directory
    accelerator, out = start_run(cfg)
    cfg = fit_default_length(cfg, "max_length", cfg.model)  # a short learned position table
    # 2. tokenizer and pairs
    tokenizer = load_tokenizer(cfg.model, cfg.trust_remote_code)
    train = load_pairs(cfg.data, tokenizer, cfg.max_length, cfg.over_length)
    held = load_pairs(cfg.eval_data, tokenizer, cfg.max_length, cfg.over_length) if cfg.eval_data else []
    if not cfg.eval_data:
        train, held = split_off(train, cfg.eval_fraction, cfg.seed)
    log.info("dpo: %d train / %d eval pairs, --loss %s, beta %.3g", len(train), len(held), cfg.loss,
             cfg.loss_beta)
    # 3. model; the reference log-probs come from it before any update (and before LoRA)
    model = load_causal_lm(cfg.model, resolve_dtype(cfg.dtype), cfg.trust_remote_code,
                           cfg.gradient_checkpointing)
    # dropout off: the policy's log-probs are compared with the reference's, and dropout in the
    # train-mode forward would move the loss away from log 2 before any update
    disable_dropout(model)
    check_positions(model, max((len(u.prompt_ids) + max(len(u.chosen_ids), len(u.rejected_ids))
                                for u in train + held), default=0),
                    "the preference pairs", f"lower --max-length (now {cfg.max_length})", cfg.model)
    if cfg.loss not in REFERENCE_FREE:
        cfg = fit_kl_samples(cfg, model)
    model.to(accelerator.device)
    if cfg.loss not in REFERENCE_FREE:
        fill_reference_logps(model, train + held, tokenizer.pad_token_id, cfg.batch_size * 2)
    if cfg.lora_r > 0:
        model = apply_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_target_modules)
    log.info("model: %s, %.2fM parameters", cfg.model, count_parameters(model) / 1e6)
    # 4. the shared loop
    pad = tokenizer.pad_token_id
    spec = LoopSpec("dpo", model, train, held or None, lambda units: collate_pairs(units, pad),
                    make_loss_fn(cfg), lambda batch: batch["input_ids"].shape[0] / 2,
                    eval_hook=make_kl_hook(cfg, tokenizer, accelerator, lambda: _eval_prompts(cfg, tokenizer),
                                           reference_free=cfg.loss in REFERENCE_FREE),
                    bar_keys=("loss", "accuracy"))
    result = train_supervised(cfg, accelerator, spec)
    # 5. the output directory becomes the final policy
    summary = {"steps": result.step, "train_seconds": round(result.train_seconds, 2), **result.final_eval}
    return finish_run(accelerator, result.model, tokenizer, out, "dpo", summary, cfg.merge_lora)
