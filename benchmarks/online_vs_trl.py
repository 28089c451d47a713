"""Seconds per iteration of TRL's GRPOTrainer / RLOOTrainer against `tether grpo` / `tether rloo`.

Both sides run the same local model (Llama, hidden 256, 4 layers, vocab 4096, random init; it
cannot emit EOS, so every response has exactly --response-len tokens), 16 prompts x G = 4
responses of 32 tokens, the same Python reward function, beta > 0 (both hold a reference),
one optimizer step per iteration over the whole batch, fp32, no gradient checkpointing. The
sides alternate round by round (A B A B ...) in one process with the same torch threads; each
round times --iters-per-round iterations per side after a warm-up iteration, and the medians
are compared. Work per iteration is counted in model FLOPs (the same for both sides: a
generation, a reference forward, a policy forward and backward), and reported as a share of
the machine's measured fp32 matmul peak.

Needs TRL 1.16 (`pip install -e ".[bench-online]"`: it cannot share one environment with the
TRL 1.12 of `ppo_vs_trl.py`).

    python benchmarks/online_vs_trl.py                 # grpo and rloo, 5 rounds x 2 iterations
    python benchmarks/online_vs_trl.py --methods grpo --rounds 7
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_utils import (LlamaShape, build_policy, forward_flops, generation_flops,  # noqa: E402
                         machine_info, matmul_peak_gflops, median, synthetic_prompts, write_json)

REWARD_SOURCE = '''
def reward(prompts, completions, **_):
    """The share of distinct words in a completion: cheap, and the same on both sides."""
    out = []
    for c in completions:
        words = c.split()
        out.append(len(set(words)) / len(words) if words else 0.0)
    return out
'''


@dataclass(frozen=True)
class Settings:
    prompts: int = 16  # per iteration
    generations: int = 4  # G
    prompt_len: int = 16  # tokens, <bos> included
    response_len: int = 32
    temperature: float = 1.0
    lr: float = 1e-6
    beta: float = 0.04
    seed: int = 0
    n_prompts: int = 256


def work_flops(shape: LlamaShape, s: Settings) -> float:
    """Model FLOPs of one iteration: generation, the reference's forward, the policy's forward
    and backward (2x the forward) over the prompt and response."""
    rows, length = s.prompts * s.generations, s.prompt_len + s.response_len
    gen = generation_flops(shape, rows, s.prompt_len, s.response_len)
    fwd = forward_flops(shape, rows, length, "lm", head_positions=s.response_len)
    return gen + fwd + 3 * fwd


def build_assets(work: Path, shape: LlamaShape, s: Settings) -> dict[str, str]:
    policy = build_policy(shape, work / "policy", seed=s.seed)
    prompts = work / "prompts.jsonl"
    texts = synthetic_prompts(s.n_prompts, s.prompt_len - 1, shape.vocab, seed=s.seed)
    prompts.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
    (work / "reward.py").write_text(REWARD_SOURCE)
    return {"policy": str(policy), "prompts": str(prompts), "reward": str(work / "reward.py")}


def load_reward(path: str) -> Any:
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_reward", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.reward


class TRLSide:
    """GRPOTrainer or RLOOTrainer built once; `run(k)` times k one-step train() calls."""

    def __init__(self, method: str, assets: dict[str, str], s: Settings, work: Path):
        from datasets import Dataset
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.trainer_callback import PrinterCallback, ProgressCallback

        tok = AutoTokenizer.from_pretrained(assets["policy"])
        texts = [json.loads(line)["prompt"] for line in Path(assets["prompts"]).read_text().splitlines()]
        dataset = Dataset.from_dict({"prompt": texts})
        model = AutoModelForCausalLM.from_pretrained(assets["policy"], dtype=torch.float32)
        common = dict(
            output_dir=str(work / f"trl_{method}"), per_device_train_batch_size=s.prompts * s.generations,
            gradient_accumulation_steps=1, num_generations=s.generations, steps_per_generation=1,
            max_completion_length=s.response_len, temperature=s.temperature, learning_rate=s.lr,
            lr_scheduler_type="constant", warmup_steps=0, beta=s.beta, seed=s.seed, max_steps=1,
            gradient_checkpointing=False, bf16=False, fp16=False, eval_strategy="no",
            save_strategy="no", report_to="none", logging_steps=10**9, disable_tqdm=True,
            dataloader_num_workers=0, num_iterations=1)
        if method == "grpo":
            from trl import GRPOConfig, GRPOTrainer

            args = GRPOConfig(**common, loss_type="grpo", scale_rewards="group")
            self.trainer = GRPOTrainer(model=model, reward_funcs=load_reward(assets["reward"]), args=args,
                                       train_dataset=dataset, processing_class=tok)
        else:
            from trl import RLOOConfig, RLOOTrainer

            args = RLOOConfig(**common)
            self.trainer = RLOOTrainer(model=model, reward_funcs=load_reward(assets["reward"]), args=args,
                                       train_dataset=dataset, processing_class=tok)
        for cb in (PrinterCallback, ProgressCallback):
            self.trainer.remove_callback(cb)

    def run(self, iters: int) -> list[float]:
        out = []
        for _ in range(iters):
            t0 = time.perf_counter()
            self.trainer.train()
            out.append(time.perf_counter() - t0)
        return out


class TetherSide:
    """`tether grpo` / `tether rloo` components built once; `run(k)` times k iterations."""

    def __init__(self, method: str, assets: dict[str, str], s: Settings, work: Path):
        from tether.config import GRPOConfig, RLOOConfig, from_dict
        from tether.recipes.online.loop import build

        cls = GRPOConfig if method == "grpo" else RLOOConfig
        self.cfg = from_dict(cls, dict(
            policy=assets["policy"], prompts=assets["prompts"], reward_fn=[f"{assets['reward']}:reward"],
            output_dir=str(work / f"tether_{method}"), batch_size=s.prompts, num_generations=s.generations,
            response_length=s.response_len, temperature=s.temperature, lr=s.lr, kl_coef=s.beta,
            max_steps=10**6, progress=False, tensorboard=False, seed=s.seed))
        self.parts = build(self.cfg)
        self.step = 0

    def run(self, iters: int) -> list[float]:
        from tether.recipes.online.loop import run_iteration

        out = []
        for _ in range(iters):
            self.step += 1
            t0 = time.perf_counter()
            result = run_iteration(self.parts, self.step)
            out.append(time.perf_counter() - t0)
            lengths = result.experience.mask.sum(-1)
            if bool((lengths != self.cfg.response_length).any()):
                raise RuntimeError("a tether response ended early: the sides would not do the same work")
        return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default="grpo,rloo", help="comma-separated: grpo, rloo")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (A B A B ...)")
    p.add_argument("--iters-per-round", type=int, default=2, help="iterations per side per round")
    p.add_argument("--output", default="benchmarks/results/online_vs_trl.json")
    p.add_argument("--workdir", default=None, help="models and run dirs (default: a temp dir)")
    args = p.parse_args(argv)
    s, shape = Settings(), LlamaShape()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="tether-online-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    assets = build_assets(work, shape, s)
    flops = work_flops(shape, s)
    results: dict[str, Any] = {"settings": asdict(s), "machine": machine_info(),
                               "gflop_per_iteration": flops / 1e9, "methods": {}}
    for method in args.methods.split(","):
        sides = {"trl": TRLSide(method, assets, s, work), "tether": TetherSide(method, assets, s, work)}
        for side in sides.values():
            side.run(1)  # warm-up: first-use costs (allocations, tether's fast-path probes)
        times: dict[str, list[float]] = {k: [] for k in sides}
        peaks = []
        for r in range(args.rounds):
            for name, side in sides.items():
                times[name] += side.run(args.iters_per_round)
            peaks.append(matmul_peak_gflops(reps=3)["best"])
            print(f"{method} round {r + 1}/{args.rounds}: trl {median(times['trl'][-args.iters_per_round:]):.3f}s"
                  f"  tether {median(times['tether'][-args.iters_per_round:]):.3f}s", flush=True)
        peak = median(peaks)
        row = {name: {"median_s": median(t), "all_s": t,
                      "share_of_peak": flops / median(t) / 1e9 / peak} for name, t in times.items()}
        row["ratio"] = row["trl"]["median_s"] / row["tether"]["median_s"]
        row["peak_gflops"] = peak
        results["methods"][method] = row
        print(f"{method}: TRL {row['trl']['median_s']:.3f} s/iter ({row['trl']['share_of_peak']:.1%} of "
              f"{peak:.1f} GFLOP/s), tether {row['tether']['median_s']:.3f} s/iter "
              f"({row['tether']['share_of_peak']:.1%}), ratio {row['ratio']:.2f}x", flush=True)
    write_json(args.output, results)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
