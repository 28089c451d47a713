"""What a PPO run leaves behind besides metrics: sample completions, held-out evaluation, and
the final policy (the output directory itself) with its critic in output_dir/critic."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tether.models.critic import save_value_head
from tether.models.save import mark_complete, save_model
from tether.recipes.online.setup import stage_name
from tether.recipes.online.steps import run_episodes
from tether.training.collectives import sum_across_processes

EVAL_SEED = 7919  # held-out prompts get the same sampling noise at every evaluation


def load_judge(spec: str | None):
    """None, the built-in world's gold judge ('world'), or a judge function named as
    'module:function' or 'path/to/file.py:function' (tether.specs)."""
    if not spec:
        return None
    if spec == "world":
        from tether.world import score

        return lambda prompts, responses: [score(p, r) for p, r in zip(prompts, responses)]
    from tether.errors import ConfigError
    from tether.specs import load_object

    try:
        return load_object(spec, "--gold-judge")
    except ConfigError as err:
        raise ConfigError(f"{err} (or give 'world', the built-in world's gold judge)") from None


def gold_score(parts: Any, result: Any, judge: Any) -> float:
    """Mean outside-judge score of this iteration's responses (decoded without the EOS), over
    every process's rollouts (each process judges its own; they hold as many)."""
    exp = result.experience
    texts = [response_text(parts, exp, i) for i in range(exp.size)]
    scores = judge(result.prompt_texts, texts)
    mean = float(sum(scores) / max(len(scores), 1))
    return sum_across_processes(parts.accelerator, mean) / parts.accelerator.num_processes


def response_text(parts: Any, exp: Any, i: int) -> str:
    """Rollout i after its prompt as text (special tokens left out): the response, or a whole
    multi-turn episode, the environment's observations included."""
    seqs = exp.seqs
    keep = seqs.attention_mask[i, seqs.n_prompt:].bool()
    return parts.tokenizer.decode(seqs.response_ids[i][keep].tolist(), skip_special_tokens=True)


def sample_rows(parts: Any, result: Any, n: int) -> list[dict]:
    """The first n rollouts of the iteration as {prompt, response, rm_score, kl, ended}."""
    exp = result.experience
    rows = []
    for i in range(min(n, exp.size)):
        response = response_text(parts, exp, i)
        rows.append({"prompt": result.prompt_texts[i], "response": response,
                     "rm_score": float(exp.rm_scores[i]), "kl": float(exp.kl[i].sum()),
                     "ended": bool(exp.ended[i])})
    return rows


@torch.no_grad()
def evaluate(parts: Any) -> dict[str, float]:
    """Mean RM score, KL to the reference (per sequence), length and EOS rate of the policy's
    responses to the held-out prompts, sampled as in training.

    The prompts go in global batches of --batch-size rows per process. Each process samples its
    rows of a batch with that batch's noise for those rows (each batch seeded on its own), and
    the sums are added over processes: N processes evaluate every prompt once, with the samples
    one process would draw with N times the batch size.
    """
    cfg, prompts, acc = parts.cfg, parts.eval_prompts, parts.accelerator
    world, rank, n = acc.num_processes, acc.process_index, len(prompts.ids)
    per_process, totals = cfg.batch_size, torch.zeros(6, dtype=torch.float64)
    for k, start in enumerate(range(0, n, per_process * world)):
        size = min(per_process * world, n - start)  # this global batch's rows
        lo, hi = rank * per_process, min((rank + 1) * per_process, size)  # this process's
        # The last batch may leave nothing to this process. It still runs every step on a
        # stand-in row (the batch's first) and counts nothing of it: under --fsdp each forward,
        # and with --env each turn, is a collective the other processes wait in.
        stand_in = lo >= hi
        if stand_in and world == 1:
            continue
        rows = range(start, start + 1) if stand_in else range(start + lo, start + hi)
        lo = 0 if stand_in else lo
        ids, mask, texts = prompts.batch(rows, parts.tokenizer.pad_token_id, parts.device)
        episodes = None
        if parts.episodes is not None:  # --env: whole episodes, with the environments' rewards
            episodes = run_episodes(parts, prompts, list(rows), EVAL_SEED + k)
            rollout = episodes.rollout
        else:
            rng = torch.Generator(device=parts.device).manual_seed(cfg.seed * 1_000_003 + EVAL_SEED + k)
            rollout = parts.generator.generate(ids, mask, rng, noise_rows=(lo, size))
        seqs = rollout.sequences()
        ref = parts.reference.logprobs(seqs, cfg.temperature)
        logprobs = _policy_logprobs(parts, seqs)
        kl = torch.where(rollout.response_mask.bool(), logprobs - ref, torch.zeros_like(ref)).sum(-1)
        transcripts = episodes.transcripts if episodes is not None else None
        scores = parts.reward.score(seqs, texts, prompts.chats_at(rows), prompts.columns_at(rows),
                                    prompts.rows_at(rows), transcripts=transcripts).scores
        env = torch.zeros(2)
        if episodes is not None:
            scores = scores + episodes.rewards.to(scores)
            called = sum(float(e.tool_calls > 0) for e in episodes.episodes)
            env = torch.tensor([float(episodes.rewards.sum()), called])
        if not stand_in:
            totals += torch.cat([torch.stack([scores.sum(), kl.sum(), rollout.response_mask.sum(),
                                              rollout.ended.sum()]).double().cpu(), env.double()])
    all_reduce = parts.all_reduce_sum()
    if all_reduce is not None:
        totals = all_reduce(totals.to(parts.device)).cpu()
    names = ("eval/rm_score", "eval/kl", "eval/length", "eval/eos_rate")
    if parts.episodes is not None:
        names += ("eval/env_reward", "eval/tool_call_rate")
    return {name: float(total) / n for name, total in zip(names, totals)}


def _policy_logprobs(parts: Any, seqs: Any) -> torch.Tensor:
    from tether.models.critic import response_logits
    from tether.ops.logprobs import token_logprobs

    lm = parts.policy_lm()
    was_training = lm.training
    lm.eval()
    logits = response_logits(lm, seqs.input_ids, seqs.attention_mask, seqs.position_ids,
                             seqs.response_ids.shape[1])
    lm.train(was_training)
    return token_logprobs(logits, seqs.response_ids, parts.cfg.temperature)


def save_final(parts: Any, out: Path, summary: dict) -> None:
    """The output directory becomes the policy (plain from_pretrained loads it); the critic is
    saved in output_dir/critic: a SequenceClassification directory (separate) or the value head
    weights (head); the critic-free methods have none. The completion marker is written last."""
    from tether.training.fsdp import full_state_dict, is_sharded

    acc = parts.accelerator
    acc.wait_for_everyone()
    # --fsdp: every process joins in gathering the whole weights; the main process writes them
    sharded = is_sharded(parts.actor)
    actor_sd = full_state_dict(parts.actor) if sharded else None
    critic_sd = full_state_dict(parts.critic) if sharded and parts.critic is not None else None
    part = lambda sd, prefix: {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)} \
        if sd is not None else None  # noqa: E731
    if acc.is_main_process:
        actor = acc.unwrap_model(parts.actor)
        critic_dir = Path(out) / "critic"
        if parts.critic is not None:
            save_model(acc.unwrap_model(parts.critic).model, parts.tokenizer, critic_dir,
                       state_dict=part(critic_sd, "model."))
        elif actor.value_head is not None:
            save_value_head(actor.value_head, critic_dir, state=part(actor_sd, "value_head."))
        save_model(actor.lm, parts.tokenizer, out, merge_lora=parts.cfg.merge_lora,
                   state_dict=part(actor_sd, "lm."))
        mark_complete(out, stage_name(parts.cfg), {**summary, "critic": parts.critic_kind})
    acc.wait_for_everyone()
