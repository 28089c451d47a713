"""`tether eval`: policy A against policy B on held-out prompts.

Both policies answer the same prompts with the same sampling seed. A judge (the built-in world's
gold judge, or any reward model) scores every response; A's win rate counts ties as half, with
a 95% Wilson interval. Also: KL(A || reference) by Monte Carlo on A's samples, mean length in
tokens, distinct-2, and a few samples side by side.

Prompts may be conversational (`data.prompts`): each policy reads them in its own chat template,
a reward-model judge in its own (`models.reward.score_texts`), and the samples written keep the
messages as their prompt.
"""

from __future__ import annotations

import logging
import statistics
from pathlib import Path
from typing import Any, Callable, Sequence

from tether.config import EvalConfig
from tether.data.prompts import Prompt, has_chats, prompt_key
from tether.errors import ConfigError
from tether.eval.sampling import Spread
from tether.eval.stats import distinct_n, win_rate
from tether.models.load import disable_dropout, load_causal_lm, load_tokenizer
from tether.training.files import atomic_write_json, write_jsonl
from tether.training.launch import make_accelerator, resolve_dtype, setup_logging

log = logging.getLogger("tether")


def _is_model(source: str) -> bool:
    path = Path(source)
    return path.is_dir() or not path.suffix  # a directory or a hub id


def _responses_from_file(source: str) -> dict[str, tuple[Prompt, str]]:
    """prompt_key(prompt) -> (prompt, response) of every row of a responses file."""
    from tether.data.io import load_rows, require_columns, where
    from tether.data.prompts import prompt_column, row_prompt

    ds = load_rows(source)
    prompt_column(ds, source)
    require_columns(ds, ["response"], source, may_be_empty=["response"], text=["response"])
    out = {}
    for i, r in enumerate(ds):
        prompt = row_prompt(r, where(source, r, i))
        out[prompt_key(prompt)] = (prompt, str(r["response"] or ""))
    return out


def _load(kind: str, source: str, cfg: EvalConfig, dtype: Any, accelerator: Any) -> Any:
    """A model for inference (eval mode, dropout off): on the launch's device, and sharded
    under --fsdp. kind: 'lm' or 'rm'."""
    if kind == "rm":
        from tether.models.reward import load_reward_model

        model = load_reward_model(source, dtype, cfg.trust_remote_code,
                                  pad_token_id=load_tokenizer(source, cfg.trust_remote_code).pad_token_id)
    else:
        model = load_causal_lm(source, dtype, cfg.trust_remote_code)
    disable_dropout(model)
    model.eval()
    if accelerator is not None:
        from tether.training.fsdp import place

        place(model, accelerator, cfg.fsdp)
    return model


def make_judge(cfg: EvalConfig, dtype: Any, accelerator: Any = None
               ) -> Callable[[Sequence[Prompt], Sequence[str]], list[float]]:
    """'world' -> the gold judge; anything else -> a reward model directory (which reads a
    conversation in its own chat template)."""
    if cfg.judge == "world":
        from tether.world import score

        return lambda prompts, responses: [score(p, r) for p, r in zip(prompts, responses)]
    from tether.models.reward import score_texts

    tok = load_tokenizer(cfg.judge, cfg.trust_remote_code)
    model = _load("rm", cfg.judge, cfg, dtype, accelerator)
    return lambda prompts, responses: score_texts(model, tok, prompts, responses, cfg.batch_size)


def _answers(source: str, prompts: list[Prompt], cfg: EvalConfig, dtype: Any, spread: Spread,
             accelerator: Any) -> tuple[list[str], Any]:
    """Responses of one policy to this process's rows of `prompts` (`spread`), and (model,
    tokenizer, samples) when it is a model (which reads a conversation in its chat template)."""
    mine = [prompts[i] for i in spread.rows]
    if not _is_model(source):
        table = _responses_from_file(source)
        missing = [p for p in prompts if prompt_key(p) not in table]
        if missing:
            from tether.errors import DataError

            raise DataError(f"{source} has no response for {len(missing)} prompt(s), e.g. {missing[0]!r}")
        return [table[prompt_key(p)][1] for p in mine], None
    from tether.data.prompts import render_prompts
    from tether.eval.sampling import sample_responses

    tok = load_tokenizer(source, cfg.trust_remote_code, padding_side="left")
    texts, chat = render_prompts(tok, prompts, cfg.prompts or source)  # before the model loads
    model = _load("lm", source, cfg, dtype, accelerator)
    show = cfg.progress and (accelerator is None or accelerator.is_main_process)
    samples = sample_responses(model, tok, texts, n=1, chat=chat, max_new_tokens=cfg.response_length,
                               temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                               batch_size=cfg.batch_size, seed=cfg.seed, part=_part(accelerator),
                               backend=cfg.generation_backend, source=source,
                               trust_remote_code=cfg.trust_remote_code,
                               progress=f"sampling {Path(source).name}" if show else "")
    assert tuple(samples.index) == spread.rows
    return samples.responses, (model, tok, samples)


def _part(accelerator: Any) -> tuple[int, int]:
    return (accelerator.process_index, accelerator.num_processes) if accelerator is not None else (0, 1)


def _prompts(cfg: EvalConfig) -> list[Prompt]:
    """The prompts of --prompts, else of the responses file; the built-in world's judge reads
    only its own plain prompts."""
    if cfg.prompts:
        from tether.data.prompts import read_prompts

        prompts = read_prompts(cfg.prompts, cfg.max_prompts)
    else:
        source = cfg.policy_a if not _is_model(cfg.policy_a) else cfg.policy_b
        prompts = [p for p, _ in _responses_from_file(source).values()]
        prompts = prompts[:cfg.max_prompts] if cfg.max_prompts > 0 else prompts
    if cfg.judge == "world" and has_chats(prompts):
        raise ConfigError("--judge world scores the built-in world's plain string prompts, not "
                          "conversations: give a reward model directory as --judge")
    return prompts


def evaluate(cfg: EvalConfig, accelerator: Any = None) -> dict:
    """Compute every figure; returns the result dict (also written to cfg.output). With an
    accelerator of several processes, each samples, judges and measures the KL of its share of
    the prompts (`eval.sampling.Spread`) and every process returns the whole result."""
    from tether.eval.sampling import gather_owned

    dtype = resolve_dtype(cfg.dtype)
    prompts = _prompts(cfg)
    spread = Spread.of(len(prompts), cfg.batch_size, _part(accelerator))
    mine = [prompts[i] for i in spread.rows]
    a, model_a = _answers(cfg.policy_a, prompts, cfg, dtype, spread, accelerator)
    b, _ = _answers(cfg.policy_b, prompts, cfg, dtype, spread, accelerator)
    judge = make_judge(cfg, dtype, accelerator)
    columns = {"a": a, "b": b, "score_a": judge(mine, a), "score_b": judge(mine, b)}
    if cfg.reference and model_a is not None:
        from tether.eval.sampling import kl_terms

        model, tok, samples = model_a
        reference = _load("lm", cfg.reference, cfg, dtype, accelerator)
        columns["kl"] = kl_terms(model, reference, tok, samples, cfg.batch_size)
    every = gather_owned(accelerator, spread.rows, spread.owned, **columns)
    a, b, score_a, score_b = every["a"], every["b"], every["score_a"], every["score_b"]
    wr = win_rate(score_a, score_b)
    result = {"policy_a": cfg.policy_a, "policy_b": cfg.policy_b, "judge": cfg.judge,
              "prompts": len(prompts), **wr.as_dict(),
              "score_a_mean": statistics.fmean(score_a), "score_b_mean": statistics.fmean(score_b),
              "length_a": statistics.fmean(len(r.split()) for r in a),
              "length_b": statistics.fmean(len(r.split()) for r in b),
              "distinct2_a": distinct_n(a, 2), "distinct2_b": distinct_n(b, 2)}
    if "kl" in every:
        result["kl_a_to_reference"] = statistics.fmean(every["kl"])
    pairs = [{"prompt": p, "a": x, "b": y, "score_a": sa, "score_b": sb}
             for p, x, y, sa, sb in zip(prompts, a, b, score_a, score_b)]
    result["samples"] = pairs[:cfg.n_samples_shown]
    if cfg.side_by_side and (accelerator is None or accelerator.is_main_process):
        write_jsonl(cfg.side_by_side, pairs)
    return result


def print_table(result: dict) -> None:
    rows = [("win rate of A", f"{result['win_rate']:.1%}  [{result['ci95_low']:.1%}, {result['ci95_high']:.1%}]"),
            ("wins / ties / losses", f"{result['wins']} / {result['ties']} / {result['losses']}"),
            ("judge score A / B", f"{result['score_a_mean']:.3f} / {result['score_b_mean']:.3f}"),
            ("length A / B (words)", f"{result['length_a']:.1f} / {result['length_b']:.1f}"),
            ("distinct-2 A / B", f"{result['distinct2_a']:.3f} / {result['distinct2_b']:.3f}")]
    if "kl_a_to_reference" in result:
        rows.append(("KL(A || reference)", f"{result['kl_a_to_reference']:.3f} nats/sequence"))
    width = max(len(k) for k, _ in rows)
    print(f"A = {result['policy_a']}\nB = {result['policy_b']}\njudge = {result['judge']}, "
          f"{result['prompts']} prompts")
    for k, v in rows:
        print(f"  {k.ljust(width)}  {v}")


def run(cfg: EvalConfig) -> dict:
    import os

    if cfg.generation_backend == "vllm":  # refused before anything is loaded
        from tether.rollout.vllm_engine import preflight

        for source in (cfg.policy_a, cfg.policy_b):
            if _is_model(source):
                preflight(source, cfg.dtype, cfg.trust_remote_code)
    # one process needs no accelerator; a launch of several (or --fsdp) spreads the prompts
    launched = int(os.environ.get("WORLD_SIZE", "1") or 1) > 1
    accelerator = make_accelerator(cfg.seed) if cfg.fsdp or launched else None
    if accelerator is None:
        setup_logging()
    result = evaluate(cfg, accelerator)
    if accelerator is None or accelerator.is_main_process:
        atomic_write_json(cfg.output, result)
        print_table(result)
    return result
