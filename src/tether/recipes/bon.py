"""`tether bon`: best-of-N sampling against a reward model (SPEC, "Alternatives").

For every prompt: sample N responses from the policy, score all of them with the reward model
in batches, keep the highest. Writes `bon.jsonl` ({prompt, response, score, responses, scores})
and `pairs.jsonl` ({prompt, chosen, rejected}: best against worst, ready for tether rm / dpo).
Under `accelerate launch` the samples are spread over the processes (`eval.sampling.Spread`),
and with --fsdp both models are sharded; the main process writes the files.

Prompts may be conversational (`data.prompts`): the policy reads them in its chat template, the
reward model in its own (`models.reward.score_texts`), and both files keep the messages; the
pairs are then in TRL's conversational preference form, chosen and rejected each one assistant
message.
"""

from __future__ import annotations

import logging
import statistics
import time

from tether.config import BoNConfig
from tether.data.prompts import Prompt, read_prompts, render_prompts
from tether.models.load import disable_dropout, load_causal_lm, load_tokenizer
from tether.models.reward import load_reward_model, score_texts
from tether.models.save import mark_complete
from tether.training.files import write_jsonl
from tether.training.fsdp import place
from tether.training.launch import resolve_dtype
from tether.training.run import start_run

log = logging.getLogger("tether")


def pair_row(prompt: Prompt, chosen: str, rejected: str) -> dict:
    """A preference pair as tether rm / dpo (and TRL) read it: strings for a plain prompt; for a
    conversation, the messages and each response as one assistant message."""
    if isinstance(prompt, str):
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    return {"prompt": prompt, "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}]}


def run(cfg: BoNConfig) -> dict:
    """Sample, score, select, write; returns the summary."""
    from tether.eval.sampling import gather_owned, sample_responses

    t0 = time.perf_counter()
    if cfg.generation_backend == "vllm":  # refused before the run directory is claimed
        from tether.rollout.vllm_engine import preflight

        preflight(cfg.policy, cfg.dtype, cfg.trust_remote_code)
    accelerator, out = start_run(cfg)
    part = (accelerator.process_index, accelerator.num_processes)
    # 1. models (dropout off: sampling and scoring are inference); under --fsdp both sharded
    dtype = resolve_dtype(cfg.dtype)
    tokenizer = load_tokenizer(cfg.policy, cfg.trust_remote_code, padding_side="left")
    policy = load_causal_lm(cfg.policy, dtype, cfg.trust_remote_code).eval()
    rm_tokenizer = load_tokenizer(cfg.reward_model, cfg.trust_remote_code)
    reward_model = load_reward_model(cfg.reward_model, dtype, cfg.trust_remote_code,
                                     rm_tokenizer.pad_token_id).eval()
    for model in (policy, reward_model):
        disable_dropout(model)
        place(model, accelerator, cfg.fsdp)
    prompts = read_prompts(cfg.prompts, cfg.max_prompts)
    texts, chat = render_prompts(tokenizer, prompts, cfg.prompts)
    # 2. N samples per prompt (this process's share), then batched scoring of all of them
    samples = sample_responses(policy, tokenizer, texts, n=cfg.n, chat=chat, max_new_tokens=cfg.response_length,
                               temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                               batch_size=cfg.batch_size, seed=cfg.seed, part=part,
                               backend=cfg.generation_backend, source=cfg.policy,
                               trust_remote_code=cfg.trust_remote_code,
                               progress=f"best-of-{cfg.n}" if cfg.progress and accelerator.is_main_process else "")
    # a conversation in the RM's own chat template (the policy's rendering when it has none)
    local_scores = score_texts(reward_model, rm_tokenizer, [prompts[i // cfg.n] for i in samples.index],
                               samples.responses, cfg.batch_size, rendered=samples.prompts)
    every = gather_owned(accelerator, samples.index, samples.owned, responses=samples.responses,
                         scores=local_scores)
    if not accelerator.is_main_process:  # the main process writes what every process found
        return {}
    responses, scores = every["responses"], every["scores"]
    # 3. select the best (and the worst, for pairs)
    rows, pairs = [], []
    for i, prompt in enumerate(prompts):
        resp = responses[i * cfg.n:(i + 1) * cfg.n]
        sc = scores[i * cfg.n:(i + 1) * cfg.n]
        best, worst = max(range(cfg.n), key=sc.__getitem__), min(range(cfg.n), key=sc.__getitem__)
        rows.append({"prompt": prompt, "response": resp[best], "score": sc[best],
                     "responses": resp, "scores": sc})
        if resp[best] != resp[worst]:
            pairs.append(pair_row(prompt, resp[best], resp[worst]))
    write_jsonl(out / "bon.jsonl", rows)
    write_jsonl(out / "pairs.jsonl", pairs)
    summary = {"prompts": len(prompts), "n": cfg.n,
               "best_score_mean": statistics.fmean(r["score"] for r in rows),
               "sample_score_mean": statistics.fmean(scores),
               "wall_seconds": round(time.perf_counter() - t0, 2)}
    mark_complete(out, "bon", summary)
    log.info("best-of-%d on %d prompts: mean RM score %.3f (single sample %.3f) -> %s",
             cfg.n, len(prompts), summary["best_score_mean"], summary["sample_score_mean"], out / "bon.jsonl")
    return summary
