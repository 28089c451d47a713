"""`tether world export` and `tether pretrain`: the built-in world's data and its base model.

`tether pretrain` trains the world's tiny Llama from scratch on the world corpus. It is the SFT
loop with an empty prompt, so every token of a document is scored: the same code path, the same
checkpoints, resume and metrics as any other training stage.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

from tether.config import PretrainConfig, SFTConfig, WorldExportConfig

log = logging.getLogger("tether")


def run_export(cfg: WorldExportConfig) -> dict:
    from tether.world import export

    paths = export(cfg.output_dir, seed=cfg.seed, n_corpus=cfg.n_corpus, n_sft=cfg.n_sft,
                   n_pairs=cfg.n_pairs, n_rankings=cfg.n_rankings, k=cfg.k, n_prompts=cfg.n_prompts,
                   n_prompts_eval=cfg.n_prompts_eval)
    for name, path in paths.items():
        print(f"{name:>14}  {path}")
    return paths


def run_pretrain(cfg: PretrainConfig) -> dict:
    """Tokenizer -> untrained model -> SFT loop over documents with empty prompts."""
    from tether.models.save import mark_complete
    from tether.recipes import sft
    from tether.training.files import write_jsonl
    from tether.world import World, build_tokenizer, init_base_model

    t0 = time.perf_counter()
    out = Path(cfg.output_dir)
    work = out / "build"
    # 1. tokenizer and an untrained model, both from the world alone
    docs = World(cfg.seed).corpus(cfg.corpus_docs)
    if not (work / "init" / "config.json").exists():
        build_tokenizer(str(work / "tokenizer"), texts=docs)
        init_base_model(str(work / "init"), str(work / "tokenizer"), cfg.seed)
        write_jsonl(work / "corpus.jsonl", ({"prompt": "", "completion": d} for d in docs))
    # 2. the SFT loop with an empty prompt scores every token of every document
    summary = sft.run(SFTConfig(
        model=str(work / "init"), data=str(work / "corpus.jsonl"), output_dir=str(out),
        seed=cfg.seed, resume=cfg.resume, max_steps=cfg.steps, lr=cfg.lr, batch_size=cfg.batch_size,
        max_length=cfg.max_length, warmup_ratio=0.05, eval_fraction=0.02, save_every=max(50, cfg.steps // 4),
        keep_checkpoints=1, progress=cfg.progress, report_to="tensorboard", lr_scheduler="cosine",
        weight_decay=0.01))
    summary["heldout_perplexity"] = math.exp(summary["eval/loss"])
    summary["wall_seconds"] = round(time.perf_counter() - t0, 1)
    mark_complete(out, "pretrain", summary)
    log.info("pretrain: held-out perplexity %.3f in %.0f s", summary["heldout_perplexity"],
             summary["wall_seconds"])
    return summary
