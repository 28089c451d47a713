"""`tether kto`: Kahneman-Tversky optimisation (Ethayarajh et al. 2024) on unpaired labels.

Each example is one response marked desirable or undesirable (`data/unpaired.py`: TRL's
`{prompt, completion, label}` rows, or any preference file read as unpaired). With
r = log pi(y|x) - log ref(y|x) summed over the response (plus its EOS) and the reference point
z0 = max(0, mean r over mismatched pairs (x, y') of the same batch), detached:

    desirable:    desirable_weight   * (1 - sigmoid(beta (r - z0)))
    undesirable:  undesirable_weight * (1 - sigmoid(beta (z0 - r)))

(docs/preference.md). z0 is the paper's estimate of KL(pi || ref): each example's prompt is
paired with the response of another example (a fixed, seeded derangement of the data), and
those mismatched pairs are scored in the same forward as the real ones.

It runs in the supervised loop, as DPO does: the reference is the starting model, whose
log-probabilities over every example and every mismatched pair are computed once before the
first update, so no second model is held while training.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from tether.config import KTOConfig
from tether.data.unpaired import Example, load_unpaired
from tether.losses.kto import kto_loss, kto_reference_point
from tether.models.load import (apply_lora, check_positions, count_parameters, disable_dropout,
                               fit_default_length, load_causal_lm, load_tokenizer)
from tether.ops.logprobs import sequence_logprobs
from tether.recipes.dpo import fit_kl_samples, make_kl_hook, reference_logps, response_rows, split_off
from tether.training.launch import resolve_dtype
from tether.training.loop import LoopSpec, train_supervised
from tether.training.run import finish_run, start_run

log = logging.getLogger("tether")


@dataclass
class KTOUnit:
    example: Example
    mismatched_ids: list[int]  # another example's response + EOS, after this prompt
    ref: float = 0.0  # log ref(y | x), filled before training
    ref_mismatched: float = 0.0  # log ref(y' | x)


def make_units(examples: Sequence[Example], seed: int) -> list[KTOUnit]:
    """Each example with the response of another one: a seeded cyclic shift of a random order,
    so no example is paired with its own response (with two or more examples)."""
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    partner = {order[k]: order[(k + 1) % len(order)] for k in range(len(order))}
    return [KTOUnit(e, examples[partner[i]].completion_ids) for i, e in enumerate(examples)]


def collate(units: Sequence[KTOUnit], pad_id: int) -> dict[str, torch.Tensor]:
    """The real (prompt, response) rows first, then the mismatched ones: (2B, L)."""
    rows = [(u.example.prompt_ids, u.example.completion_ids) for u in units] + \
        [(u.example.prompt_ids, u.mismatched_ids) for u in units]
    return {**response_rows(rows, pad_id),
            "ref_logps": torch.tensor([u.ref for u in units] + [u.ref_mismatched for u in units]),
            "desirable": torch.tensor([u.example.desirable for u in units])}


def _logps(model: Any, batch: dict) -> torch.Tensor:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return sequence_logprobs(logits, batch["labels"])[0]


def fill_reference_logps(model: Any, units: Sequence[KTOUnit], pad_id: int, batch_size: int) -> None:
    for u, (real, mismatched) in zip(units, reference_logps(model, units, lambda c: collate(c, pad_id),
                                                             batch_size)):
        u.ref, u.ref_mismatched = real, mismatched


def make_loss_fn(cfg: KTOConfig):
    def loss_fn(model: Any, batch: dict) -> tuple[torch.Tensor, dict]:
        logps, ref = _logps(model, batch), batch["ref_logps"]
        n = logps.shape[0] // 2
        z0 = kto_reference_point(logps[n:], ref[n:])
        losses, stats = kto_loss(logps[:n], ref[:n], batch["desirable"], z0, cfg.beta,
                                 cfg.desirable_weight, cfg.undesirable_weight)
        desirable = batch["desirable"]
        correct = ((logps[:n] - ref[:n]).detach() > 0) == desirable
        # the loop wants sums over the batch's examples and divides by their count: a
        # statistic that is a mean over the batch goes in times n
        names = {"kto/z0": "z0", "rewards/desirable": "reward_desirable",
                 "rewards/undesirable": "reward_undesirable", "kto/desirable_frac": "desirable_frac"}
        sums = {names[k]: v * n for k, v in stats.items()}
        sums["accuracy"] = correct.float().sum()  # r > 0 exactly on the desirable examples
        return losses.sum(), sums
    return loss_fn


def run(cfg: KTOConfig) -> dict:
    """Train with KTO and save the policy into cfg.output_dir; returns the summary."""
    # 1. runtime and run directory
    accelerator, out = start_run(cfg)
    cfg = fit_default_length(cfg, "max_length", cfg.model)  # a short learned position table
    # 2. tokenizer and examples, each with its mismatched partner
    tokenizer = load_tokenizer(cfg.model, cfg.trust_remote_code)
    examples = load_unpaired(cfg.data, tokenizer, cfg.max_length, cfg.over_length)
    held_examples = load_unpaired(cfg.eval_data, tokenizer, cfg.max_length, cfg.over_length) \
        if cfg.eval_data else []
    if not cfg.eval_data:  # at least two held out: each is scored beside another's response
        examples, held_examples = split_off(examples, cfg.eval_fraction, cfg.seed, least=2)
    train, held = make_units(examples, cfg.seed), make_units(held_examples, cfg.seed + 1)
    n_good = sum(e.desirable for e in examples)
    log.info("kto: %d train examples (%d desirable, %d undesirable), %d eval, beta %.3g", len(train),
             n_good, len(train) - n_good, len(held), cfg.beta)
    if n_good in (0, len(train)):
        log.warning("kto: every training example is %s; KTO learns from both kinds",
                    "desirable" if n_good else "undesirable")
    # 3. model; the reference log-probs come from it before any update (and before LoRA)
    model = load_causal_lm(cfg.model, resolve_dtype(cfg.dtype), cfg.trust_remote_code,
                           cfg.gradient_checkpointing)
    disable_dropout(model)  # as in DPO: the log-probs are compared with the reference's
    longest = max((len(u.example.prompt_ids) + max(len(u.example.completion_ids), len(u.mismatched_ids))
                   for u in train + held), default=0)
    check_positions(model, longest, "the examples (each also with another example's response)",
                    f"lower --max-length (now {cfg.max_length})", cfg.model)
    cfg = fit_kl_samples(cfg, model)
    model.to(accelerator.device)
    fill_reference_logps(model, train + held, tokenizer.pad_token_id, cfg.batch_size * 2)
    if cfg.lora_r > 0:
        model = apply_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_target_modules)
    log.info("model: %s, %.2fM parameters", cfg.model, count_parameters(model) / 1e6)
    # 4. the shared loop
    pad = tokenizer.pad_token_id
    prompts = list(dict.fromkeys((e.prompt, e.chat) for e in (held_examples or examples)))[:cfg.kl_samples]
    spec = LoopSpec("kto", model, train, held or None, lambda units: collate(units, pad), make_loss_fn(cfg),
                    lambda batch: batch["input_ids"].shape[0] / 2,
                    eval_hook=make_kl_hook(cfg, tokenizer, accelerator,
                                           lambda: ([p for p, _ in prompts], any(c for _, c in prompts))),
                    bar_keys=("loss", "accuracy"))
    result = train_supervised(cfg, accelerator, spec)
    # 5. the output directory becomes the final policy
    summary = {"steps": result.step, "train_seconds": round(result.train_seconds, 2), **result.final_eval}
    return finish_run(accelerator, result.model, tokenizer, out, "kto", summary, cfg.merge_lora)
