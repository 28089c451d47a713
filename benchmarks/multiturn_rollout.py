"""What multi-turn rollouts (`--env`) cost against single-turn ones, on the same model and the
same number of tokens the policy writes.

- single: one response of TURNS x TURN_TOKENS tokens per prompt (`KVCacheSampler.generate`, as
  `tether grpo` samples without --env);
- multi: episodes of TURNS turns of TURN_TOKENS tokens, with an observation of OBS_TOKENS
  tokens after each turn but the last (`tether.envs.episodes.EpisodeRunner`, as `tether grpo
  --env` samples), through the same sampler, which keeps its KV cache from turn to turn
  (`rollout.generate.TurnSession`);
- multi_prefill: the same episodes with the cache dropped after each turn, every turn's whole
  context prefilled again (what the hf sampler does, and the torch one for models its fused
  decode step does not run).

No EOS is sampled (the benchmark tokenizer's EOS is forbidden), so every row writes exactly
the same policy tokens on both sides. The two sides alternate (A B A B ...), --rounds times;
the medians are compared as policy tokens per second, their ratio, and each side's share of
the machine's measured fp32 matmul peak (the model FLOPs of the generation it did: the
multi-turn side's include its prefills of every turn's context).

    python benchmarks/multiturn_rollout.py                  # the default shape (hidden 256, 4 layers)
    python benchmarks/multiturn_rollout.py --rounds 7 --rows 32
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_utils import (LlamaShape, build_policy, generation_flops,  # noqa: E402
                         machine_info, matmul_peak_gflops, median, write_json)


class FixedObservation:
    """An environment that answers every turn with the same words and ends after `turns`."""

    turns = 3
    words = "w10 w11 w12 w13 w14 w15 w16 w17 w18 w19 w20 w21 w22 w23 w24 w25"

    def reset(self, row):
        self.n = 0
        return None

    def step(self, action):
        self.n += 1
        return (None if self.n >= self.turns else " " + self.words), None, self.n >= self.turns


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=32, help="episodes (prompts) per rollout")
    ap.add_argument("--prompt-len", type=int, default=32, help="prompt tokens")
    ap.add_argument("--turns", type=int, default=3, help="policy turns per episode")
    ap.add_argument("--turn-tokens", type=int, default=32, help="tokens per policy turn")
    ap.add_argument("--rounds", type=int, default=5, help="A B rounds; medians are compared")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--out", default="benchmarks/results/multiturn_rollout.json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer

    from tether.envs.api import EnvSpec
    from tether.envs.episodes import EpisodeLimits, EpisodeRunner, generator_turns
    from tether.models.load import load_causal_lm
    from tether.rollout.generate import KVCacheSampler, SamplingParams, left_pad

    shape = LlamaShape()
    tmp = Path(tempfile.mkdtemp(prefix="tether-multiturn-"))
    policy = build_policy(shape, tmp / "policy")
    tok = AutoTokenizer.from_pretrained(policy)
    model = load_causal_lm(str(policy)).eval()
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(4, shape.vocab, (args.rows, args.prompt_len), generator=g).tolist()
    total = args.turns * args.turn_tokens
    FixedObservation.turns = args.turns
    obs_tokens = len(tok(" " + FixedObservation.words, add_special_tokens=False)["input_ids"])
    single = KVCacheSampler(model, SamplingParams(total, 1.0, pad_token_id=tok.pad_token_id))
    multi = KVCacheSampler(model, SamplingParams(args.turn_tokens, 1.0, pad_token_id=tok.pad_token_id))
    prefill = KVCacheSampler(model, SamplingParams(args.turn_tokens, 1.0, pad_token_id=tok.pad_token_id))
    prefill.session = lambda: None  # no cache kept between turns
    runner = EpisodeRunner([EnvSpec("FixedObservation", FixedObservation)], tok, (), tok.pad_token_id,
                           EpisodeLimits(args.turns, total + (args.turns - 1) * obs_tokens, args.turn_tokens))
    rows = [{} for _ in prompts]
    where = [f"row {i}" for i in range(args.rows)]

    def run_single(seed: int) -> int:
        ids, mask = left_pad(prompts, tok.pad_token_id)
        out = single.generate(ids, mask, torch.Generator().manual_seed(seed))
        return int(out.response_mask.sum())

    def episodes(sampler, seed: int) -> int:
        rng = lambda turn: torch.Generator().manual_seed(seed * 64 + turn)  # noqa: E731
        out = runner.run(prompts, rows, where, [False] * args.rows,
                         generator_turns(sampler, (), tok.pad_token_id, "cpu", rng))
        return int(out.rollout.response_mask.sum())

    sides = {"single": run_single, "multi": lambda seed: episodes(multi, seed),
             "multi_prefill": lambda seed: episodes(prefill, seed)}
    times: dict[str, list[float]] = {k: [] for k in sides}
    tokens: dict[str, int] = {}
    for fn in sides.values():  # warm-up
        fn(0)
    for r in range(args.rounds):
        for name, fn in sides.items():
            t0 = time.perf_counter()
            tokens[name] = fn(r + 1)
            times[name].append(time.perf_counter() - t0)
    peak = matmul_peak_gflops()["best"]
    after_prompt = total + (args.turns - 1) * obs_tokens
    # single and multi: every token after the prompt goes through one decode step
    flops = {"single": generation_flops(shape, args.rows, args.prompt_len, total),
             "multi": generation_flops(shape, args.rows, args.prompt_len, after_prompt)}
    # multi_prefill: turn k prefills its whole context again, then decodes its turn
    context, prefill_flops = args.prompt_len, 0.0
    for k in range(args.turns):
        prefill_flops += generation_flops(shape, args.rows, context, args.turn_tokens)
        context += args.turn_tokens + (obs_tokens if k < args.turns - 1 else 0)
    flops["multi_prefill"] = prefill_flops
    result = {"machine": machine_info(), "shape": shape.__dict__, "args": vars(args),
              "observation_tokens": obs_tokens, "peak_gflops": peak}
    for name in sides:
        t = median(times[name])
        result[name] = {"seconds": times[name], "median_s": t, "policy_tokens": tokens[name],
                        "policy_tokens_per_s": tokens[name] / t,
                        "peak_fraction": flops[name] / t / 1e9 / peak}
    for name in ("multi", "multi_prefill"):
        result[f"{name}_over_single_tokens_per_s"] = (result[name]["policy_tokens_per_s"]
                                                      / result["single"]["policy_tokens_per_s"])
    write_json(args.out, result)
    print(f"single turn: {result['single']['policy_tokens_per_s']:.0f} policy tokens/s "
          f"({100 * result['single']['peak_fraction']:.1f}% of fp32 peak)")
    for name, how in (("multi", "cache kept"), ("multi_prefill", "each turn prefilled")):
        print(f"{args.turns} turns + {obs_tokens}-token observations, {how}: "
              f"{result[name]['policy_tokens_per_s']:.0f} policy tokens/s "
              f"({100 * result[name]['peak_fraction']:.1f}% of peak), "
              f"{result[f'{name}_over_single_tokens_per_s']:.2f}x single")


if __name__ == "__main__":
    main()
