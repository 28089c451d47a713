"""Memory per process on 2 processes, DDP (replicated) against --fsdp (FSDP2, sharded), on a
locally built Llama of about 70M parameters, with the analytic bytes; for PPO also the seconds
per iteration of DDP, --fsdp and --fsdp --fsdp-sampling per-layer, on a smaller model.

Each side is one `accelerate launch --multi_gpu --num_processes 2` (gloo on CPUs); the peak
resident set of its largest process is read from the launcher's RUSAGE_CHILDREN, and the
resident set while training from the run's own metrics. The sides take turns (A B A B ...),
each --repeats times, and the medians are reported. On a GPU, the same script measures host
memory only.

    python benchmarks/fsdp_memory.py                  # tether sft, ~70M parameters, 3 repeats
    python benchmarks/fsdp_memory.py --stage ppo      # tether ppo: memory, then speed
    python benchmarks/fsdp_memory.py --stage ppo --skip-speed
    python benchmarks/fsdp_memory.py --hidden 512 --layers 4
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_utils import (LlamaShape, build_policy, build_reward_model, synthetic_prompts,  # noqa: E402
                         write_json)


def training_rss_mb(out: Path, prefix: str = "train") -> tuple[float, float]:
    """The largest process's resident memory at the last logged training step (train/rss_mb,
    or memory/rss_mb for PPO): after the full model each process loaded has been sharded (and
    returned to the OS, with TETHER_CPU_MALLOC=0) and before the final gather."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in rows if f"{prefix}/rss_mb" in r][-1]
    return last[f"{prefix}/rss_mb"], last[f"{prefix}/state_mb"]


def iteration_seconds(out: Path) -> tuple[float, dict[str, float]]:
    """Median seconds per PPO iteration after the first (warm-up), and the median phases."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][1:]
    phases = {k: statistics.median(r[f"timing/{k}"] for r in rows) for k in ("rollout", "score", "update")}
    return statistics.median(r["timing/iteration"] for r in rows), phases


def peak_rss_mb(args: list[str]) -> float:
    """Run one 2-process launch in a fresh interpreter; the largest child's peak RSS in MB."""
    code = ("import resource, subprocess, sys; "
            "r = subprocess.run(sys.argv[1:]); "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(r.returncode)")
    cmd = [sys.executable, "-c", code, sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
           "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend",
           "no", "-m", "tether", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TETHER_CPU_MALLOC": "0"}  # freed memory goes back
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(done.stdout[-2000:] + done.stderr[-2000:])
    return int(done.stdout.strip().splitlines()[-1]) / 1024  # Linux reports KiB


def llama_shape(hidden: int, layers: int, vocab: int) -> LlamaShape:
    heads = max(1, hidden // 64)
    return LlamaShape(hidden=hidden, layers=layers, heads=heads, kv_heads=heads,
                      intermediate=(8 * hidden // 3 + 15) // 16 * 16, vocab=vocab)


def count(model_dir: Path, kind: str = "lm") -> int:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    cls = AutoModelForCausalLM if kind == "lm" else AutoModelForSequenceClassification
    return sum(p.numel() for p in cls.from_pretrained(model_dir).parameters())


def sft_memory(a: argparse.Namespace, work: Path) -> dict:
    shape = llama_shape(a.hidden, a.layers, a.vocab)
    model = build_policy(shape, work / "model", seed=0)
    n_params = count(model)
    texts = synthetic_prompts(64, 48, shape.vocab, seed=0)
    data = work / "sft.jsonl"
    data.write_text("".join(json.dumps({"prompt": t[:len(t) // 2], "completion": t[len(t) // 2:]}) + "\n"
                            for t in texts))
    common = ["--model", str(model), "--data", str(data), "--max-steps", str(a.steps), "--batch-size", "2",
              "--lr", "1e-4", "--eval-fraction", "0", "--no-progress", "--no-tensorboard", "--save-every", "1000",
              "--log-every", "1"]
    runs = measure(a.repeats, {"ddp": [], "fsdp": ["--fsdp"]},
                   lambda out, extra: ["sft", *common, "--output-dir", str(out), *extra], work, "train")
    mb = n_params / 2**20
    analytic = {  # fp32 weights 4 B and AdamW's two moments 8 B per parameter (gradients, another
        "ddp": 12 * mb, "fsdp": 12 * mb / 2,  # 4 B, are freed after each step and not counted)
    }
    return {"stage": "sft", "parameters": n_params, **runs, "analytic_states_mb_per_process": analytic}


def measure(repeats: int, sides: dict[str, list[str]], command, work: Path, prefix: str) -> dict:
    peaks: dict[str, list[float]] = {k: [] for k in sides}
    steady: dict[str, list[float]] = {k: [] for k in sides}
    state: dict[str, list[float]] = {k: [] for k in sides}
    for r in range(repeats):
        for side, extra in sides.items():
            out = work / f"{side}-{r}"
            peaks[side].append(peak_rss_mb(command(out, extra)))
            rss, held = training_rss_mb(out, prefix)
            steady[side].append(rss)
            state[side].append(held)
            print(f"repeat {r + 1}: {side} peak {peaks[side][-1]:.0f} MB, while training "
                  f"{rss:.0f} MB, weights + optimizer state {held:.0f} MB", flush=True)
    med = lambda runs: {k: statistics.median(v) for k, v in runs.items()}  # noqa: E731
    return {"peak_rss_mb": med(peaks), "runs": peaks, "training_rss_mb": med(steady),
            "training_runs": steady, "state_mb": med(state)}


def ppo_models(shape: LlamaShape, work: Path) -> tuple[Path, Path, Path]:
    policy = build_policy(shape, work / f"policy-{shape.hidden}", seed=0)
    rm = build_reward_model(policy, work / f"rm-{shape.hidden}", seed=0)
    prompts = work / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": t}) + "\n"
                               for t in synthetic_prompts(64, 16, shape.vocab, seed=0)))
    return policy, rm, prompts


def ppo_command(policy: Path, rm: Path, prompts: Path, steps: int, batch: int, length: int):
    return lambda out, extra: [
        "ppo", "--policy", str(policy), "--reward-model", str(rm), "--prompts", str(prompts),
        "--output-dir", str(out), "--max-steps", str(steps), "--batch-size", str(batch),
        "--response-length", str(length), "--ppo-epochs", "1", "--save-every", "1000",
        "--no-progress", "--no-tensorboard", *extra]


def ppo_memory(a: argparse.Namespace, work: Path) -> dict:
    """PPO with its four models: policy and separate critic (trained: weights, AdamW moments;
    gradients are freed after each step), reference and RM (frozen: weights only).

    Each side is a launch of this script's worker (`--worker`), which builds tether's PPO parts
    and runs iterations, reading its own memory after each: the resident set, the resident set
    once glibc has handed its free heap back (malloc_trim: the memory the process really holds;
    on CPUs freed blocks otherwise stay resident), and the peak resident set so far."""
    shape = llama_shape(a.hidden, a.layers, a.vocab)
    policy, rm, prompts = ppo_models(shape, work)
    n_lm, n_rm = count(policy), count(rm, "rm")
    sides = {"ddp": "0", "fsdp": "1"}
    rows: dict[str, list[dict]] = {k: [] for k in sides}
    for r in range(a.repeats):
        for side, flag in sides.items():
            out = work / f"worker-{side}-{r}"
            out.mkdir()
            cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                   "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", __file__,
                   "--worker", str(out), "--worker-fsdp", flag, "--worker-models", str(policy), str(rm), str(prompts),
                   "--steps", str(a.steps)]
            env = {**os.environ, "OMP_NUM_THREADS": "1", "TETHER_CPU_MALLOC": "0"}
            done = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if done.returncode != 0:
                raise RuntimeError(done.stdout[-2000:] + done.stderr[-2000:])
            ranks = [json.loads(f.read_text()) for f in sorted(out.glob("rank-*.json"))]
            last = {k: max(rk[-1][k] for rk in ranks) for k in ranks[0][-1]}  # the largest process
            rows[side].append(last)
            print(f"repeat {r + 1}: {side} " + ", ".join(f"{k} {v:.0f} MB" for k, v in last.items()), flush=True)
    med = {side: {k: statistics.median(x[k] for x in v) for k in v[0]} for side, v in rows.items()}
    bytes_per = {"policy": 12, "critic": 12, "reference": 4, "reward_model": 4}
    params = {"policy": n_lm, "critic": n_rm, "reference": n_lm, "reward_model": n_rm}
    per_model = {k: bytes_per[k] * params[k] / 2**20 for k in params}
    analytic = {"ddp": sum(per_model.values()), "fsdp": sum(per_model.values()) / 2}
    return {"stage": "ppo", "parameters": params, "bytes_per_parameter": bytes_per,
            "analytic_mb_per_model_ddp": per_model, "analytic_states_mb_per_process": analytic,
            "measured_mb_largest_process": med, "runs": rows}


def worker(out: Path, fsdp: bool, policy: str, rm: str, prompts: str, steps: int) -> int:
    """One process of a `ppo_memory` launch: build, run `steps` iterations, record memory."""
    import resource

    import psutil
    from tether.config import PPOConfig
    from tether.recipes.online.loop import run_iteration
    from tether.recipes.online.setup import build
    from tether.training.memory import release_freed_memory

    cfg = PPOConfig(policy=policy, reward_model=rm, prompts=prompts, output_dir=str(out / "unused"),
                    batch_size=4, response_length=16, ppo_epochs=1, fsdp=fsdp, progress=False,
                    tensorboard=False)
    parts = build(cfg)
    rows = []
    for step in range(1, steps + 1):
        run_iteration(parts, step)
        row = {"state_mb": parts.state_bytes() / 2**20, "rss_mb": psutil.Process().memory_info().rss / 2**20}
        release_freed_memory()
        row["rss_trimmed_mb"] = psutil.Process().memory_info().rss / 2**20
        row["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        rows.append(row)
    (out / f"rank-{parts.accelerator.process_index}.json").write_text(json.dumps(rows))
    return 0


def ppo_speed(a: argparse.Namespace, work: Path) -> dict:
    """Seconds per PPO iteration on 2 processes: DDP, --fsdp (the policy gathered once per
    rollout) and --fsdp --fsdp-sampling per-layer (gathered for every token), taking turns."""
    shape = llama_shape(a.speed_hidden, a.speed_layers, 4096)
    policy, rm, prompts = ppo_models(shape, work)
    command = ppo_command(policy, rm, prompts, a.speed_steps, 16, 32)
    sides = {"ddp": [], "fsdp": ["--fsdp"], "fsdp_per_layer": ["--fsdp", "--fsdp-sampling", "per-layer"]}
    seconds: dict[str, list[float]] = {k: [] for k in sides}
    phases: dict[str, list[dict]] = {k: [] for k in sides}
    for r in range(a.speed_repeats):
        for side, extra in sides.items():
            out = work / f"speed-{side}-{r}"
            peak_rss_mb(command(out, extra))
            sec, ph = iteration_seconds(out)
            seconds[side].append(sec)
            phases[side].append(ph)
            print(f"speed repeat {r + 1}: {side} {sec:.3f} s/iteration {ph}", flush=True)
    med = {k: statistics.median(v) for k, v in seconds.items()}
    phase_med = {k: {p: statistics.median(x[p] for x in v) for p in ("rollout", "score", "update")}
                 for k, v in phases.items()}
    return {"parameters": count(policy), "rollouts_per_iteration": 16, "response_length": 32,
            "seconds_per_iteration": med, "runs": seconds, "phases": phase_med,
            "fsdp_over_ddp": med["fsdp"] / med["ddp"],
            "per_layer_over_gathered": med["fsdp_per_layer"] / med["fsdp"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--stage", choices=["sft", "ppo"], default="sft")
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--speed-hidden", type=int, default=256, help="PPO speed: the model's width")
    p.add_argument("--speed-layers", type=int, default=4)
    p.add_argument("--speed-steps", type=int, default=4, help="PPO speed: iterations per run (the first is warm-up)")
    p.add_argument("--speed-repeats", type=int, default=5)
    p.add_argument("--skip-speed", action="store_true")
    p.add_argument("--skip-memory", action="store_true", help="--stage ppo: the speed part only")
    p.add_argument("--output", default="")
    p.add_argument("--worker", default="", help=argparse.SUPPRESS)
    p.add_argument("--worker-fsdp", default="0", help=argparse.SUPPRESS)
    p.add_argument("--worker-models", nargs=3, default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        return worker(Path(a.worker), a.worker_fsdp == "1", *a.worker_models, a.steps)
    import torch

    work = Path(tempfile.mkdtemp(prefix="tether-fsdp-mem-"))
    result = {"torch": torch.__version__}
    if a.stage == "sft":
        result.update(sft_memory(a, work))
    else:
        if not a.skip_memory:
            result.update(ppo_memory(a, work))
        if not a.skip_speed:
            result["speed"] = ppo_speed(a, work)
    print(json.dumps(result, indent=2))
    write_json(a.output or f"benchmarks/results/fsdp_{a.stage}_memory.json", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
