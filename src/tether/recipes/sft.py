"""`tether sft`: supervised fine-tuning with the loss on response tokens only (SPEC stage 1)."""

from __future__ import annotations

import logging
from typing import Any

from tether.config import SFTConfig
from tether.data.io import load_rows, split_holdout
from tether.data.sft import IGNORE, collate, collate_packed, pack, tokenize_sft
from tether.models.load import (apply_lora, check_positions, count_parameters, fit_default_length,
                               load_causal_lm, load_tokenizer)
from tether.training.launch import resolve_dtype
from tether.training.loop import LoopSpec, train_supervised
from tether.training.run import finish_run, start_run

log = logging.getLogger("tether")


def load_sft_examples(cfg: SFTConfig, tokenizer: Any) -> tuple[list, list]:
    """Tokenised train and held-out examples (held out from --data when no --eval-data)."""
    train_ds = load_rows(cfg.data)
    eval_ds = load_rows(cfg.eval_data) if cfg.eval_data else None
    if eval_ds is None:
        train_ds, eval_ds = split_holdout(train_ds, cfg.eval_fraction, cfg.seed)
    train = tokenize_sft(train_ds, tokenizer, cfg.data, cfg.max_length, cfg.over_length)
    held = tokenize_sft(eval_ds, tokenizer, cfg.eval_data or cfg.data, cfg.max_length,
                        cfg.over_length, held_out=True) if eval_ds is not None else []
    return train, held


def sft_loss_sum(model: Any, batch: dict) -> tuple[Any, dict]:
    """Summed NLL over scored tokens (the loop normalises by the global token count)."""
    from tether.losses.sft import sft_loss

    kwargs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    logits = model(**kwargs).logits
    loss, _ = sft_loss(logits, batch["labels"], normalizer=1.0)
    return loss, {}


def scored_tokens(batch: dict) -> float:
    return float((batch["labels"][:, 1:] != IGNORE).sum())


def run(cfg: SFTConfig) -> dict:
    """Train, evaluate and save the SFT model into cfg.output_dir; returns the summary."""
    # 1. runtime and run directory
    accelerator, out = start_run(cfg)
    cfg = fit_default_length(cfg, "max_length", cfg.model)  # a short learned position table
    # 2. tokenizer and data
    tokenizer = load_tokenizer(cfg.model, cfg.trust_remote_code)
    train, held = load_sft_examples(cfg, tokenizer)
    pad = tokenizer.pad_token_id
    if cfg.packing:
        train_units, eval_units = pack(train, cfg.max_length), pack(held, cfg.max_length) if held else None
        collate_fn = lambda rows: collate_packed(rows, pad)  # noqa: E731
        tokens_fn = lambda b: int(b["token_count"])  # noqa: E731
    else:
        train_units, eval_units = train, held or None
        collate_fn = lambda rows: collate(rows, pad)  # noqa: E731
        tokens_fn = lambda b: int(b["attention_mask"].sum())  # noqa: E731
    log.info("sft: %d train / %d eval examples%s", len(train), len(held),
             f" packed into {len(train_units)} rows" if cfg.packing else "")
    # 3. model (LoRA through peft when --lora-r > 0)
    model = load_causal_lm(cfg.model, resolve_dtype(cfg.dtype), cfg.trust_remote_code,
                           cfg.gradient_checkpointing)
    check_positions(model, max((len(ex.input_ids) for ex in [*train, *held]), default=0),
                    f"the examples of {cfg.data}", f"lower --max-length (now {cfg.max_length}; longer "
                    "examples are cut or dropped as --over-length says)", cfg.model)
    if cfg.lora_r > 0:
        model = apply_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_target_modules)
    log.info("model: %s, %.2fM parameters", cfg.model, count_parameters(model) / 1e6)
    # 4. the shared loop: data order, accumulation, eval, checkpoints, resume, signals
    spec = LoopSpec("sft", model, train_units, eval_units, collate_fn, sft_loss_sum, scored_tokens,
                    tokens_fn=tokens_fn)
    result = train_supervised(cfg, accelerator, spec)
    # 5. the output directory becomes the final model
    summary = {"steps": result.step, "train_seconds": round(result.train_seconds, 2), **result.final_eval}
    return finish_run(accelerator, result.model, tokenizer, out, "sft", summary, cfg.merge_lora)
