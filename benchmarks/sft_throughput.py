"""SFT throughput of `tether sft`: training tokens per second on two small Llamas.

    .venv/bin/python benchmarks/sft_throughput.py [--rounds 3] [--steps 8]
        [--models stories260k,llama10m] [--output benchmarks/results/sft_throughput.json]

Models: ../shared/models/stories260K (the 260K-parameter llama2.c TinyStories model, when the
directory exists) and a ~10M-parameter Llama built locally (hidden 384, 6 layers, 6 heads,
intermediate 1024, vocab 4096, random init with a fixed seed, word-level tokenizer).
Data: a fixed synthetic prompt/completion .jsonl per model (seeded; see `make_data`).

Each round runs `tether sft --max-steps N` once per model, alternating the models (this
machine's speed drifts). The number is `train/tokens_per_sec` from each run's metrics.jsonl
(tokens = attended prompt+response tokens of the step, over the step's wall time, measured by
tether's training loop; evaluation and checkpoints are outside it), median over every step but
the first of each run. A model-FLOP estimate (fwd+bwd = 3x forward, conventions in
bench_utils) turns tokens/s into GFLOP/s, against the fp32 matmul peak measured each round.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_utils import (LlamaShape, build_policy, forward_flops, machine_info,  # noqa: E402
                         matmul_peak_gflops, median, write_json)

REPO = Path(__file__).resolve().parent.parent
STORIES = REPO.parent / "shared" / "models" / "stories260K"
LLAMA10M = LlamaShape(hidden=384, layers=6, heads=6, kv_heads=6, intermediate=1024, vocab=4096)

# Plain words the TinyStories tokenizer knows well, for the stories260K data set.
STORY_WORDS = ("once upon a time there was little girl named lily she loved to play outside in "
               "the park with her dog one day saw big red ball and wanted it mom said yes they "
               "went home happy friends tree sun bird cat boy tom sky blue fun run jump").split()


def make_data(path: Path, kind: str, n: int, seed: int = 0) -> None:
    """n prompt/completion rows. "words": 31 + 95 tokens of a 4096-word vocabulary (with <bos>
    and <eos>, 128 tokens per example); "stories": 16 + 48 English words (the stories260K
    tokenizer makes ~1.5 tokens of each)."""
    rng = random.Random(seed)
    with path.open("w") as f:
        for _ in range(n):
            if kind == "words":
                prompt = " ".join(f"w{rng.randrange(4, 4096)}" for _ in range(31))
                completion = " ".join(f"w{rng.randrange(4, 4096)}" for _ in range(95))
            else:
                prompt = " ".join(rng.choice(STORY_WORDS) for _ in range(16))
                completion = " " + " ".join(rng.choice(STORY_WORDS) for _ in range(48))
            f.write(json.dumps({"prompt": prompt, "completion": completion}) + "\n")


def shape_of(model_dir: Path) -> LlamaShape:
    cfg = json.loads((model_dir / "config.json").read_text())
    return LlamaShape(hidden=cfg["hidden_size"], layers=cfg["num_hidden_layers"],
                      heads=cfg["num_attention_heads"],
                      kv_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
                      intermediate=cfg["intermediate_size"], vocab=cfg["vocab_size"],
                      tie_embeddings=bool(cfg.get("tie_word_embeddings", False)))


def mean_tokens(model_dir: Path, data: Path) -> float:
    """Mean tokens per example as tether builds them: prompt (with BOS) + completion + EOS."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    lens = [len(tok(r["prompt"])["input_ids"]) + len(tok(r["completion"], add_special_tokens=False)["input_ids"]) + 1
            for r in rows]
    return sum(lens) / len(lens)


def flops_per_token(shape: LlamaShape, seq_len: float) -> float:
    """Training FLOPs per token: 3x a forward (logits at every position) at this length."""
    n = max(1, round(seq_len))
    return 3.0 * forward_flops(shape, 1, n, "lm") / n


def run_sft(model: Path, data: Path, out: Path, steps: int, batch: int, max_length: int,
            seed: int, threads: int = 0) -> list[float]:
    """One `tether sft` run; train/tokens_per_sec of each step."""
    cmd = [sys.executable, "-m", "tether", "sft", "--model", str(model), "--data", str(data),
           "--output-dir", str(out), "--max-steps", str(steps), "--batch-size", str(batch),
           "--max-length", str(max_length), "--eval-fraction", "0", "--lr", "1e-4",
           "--warmup-ratio", "0", "--save-every", "100000", "--tensorboard", "false",
           "--progress", "false", "--seed", str(seed)]
    env = dict(os.environ)
    if threads > 0:
        env["OMP_NUM_THREADS"] = str(threads)  # torch's intra-op threads in the child
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"tether sft failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    by_step = {r["step"]: r["train/tokens_per_sec"] for r in rows if "train/tokens_per_sec" in r}
    return [by_step[k] for k in sorted(by_step)]


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=8, help="optimizer steps per run (the first is not counted)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--models", default="stories260k,llama10m")
    p.add_argument("--output", default=str(REPO / "benchmarks" / "results" / "sft_throughput.json"))
    p.add_argument("--workdir", default=None)
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads of each tether run; 0 (default) leaves torch's default")
    args = p.parse_args(argv)
    if args.steps < 2:
        p.error("--steps must be >= 2 (the first step is a warm-up)")
    wanted = [m.strip() for m in args.models.split(",") if m.strip()]

    work = Path(args.workdir or tempfile.mkdtemp(prefix="sft_throughput_"))
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    models: dict[str, dict[str, Any]] = {}
    if "stories260k" in wanted:
        if STORIES.is_dir():
            data = work / "stories.jsonl"
            make_data(data, "stories", 512)
            models["stories260k"] = {"dir": STORIES, "data": data, "shape": shape_of(STORIES)}
        else:
            print(f"skipping stories260k: {STORIES} does not exist")
    if "llama10m" in wanted:
        model_dir = build_policy(LLAMA10M, work / "llama10m", seed=0)
        data = work / "words.jsonl"
        make_data(data, "words", 512)
        models["llama10m"] = {"dir": model_dir, "data": data, "shape": LLAMA10M}
    if not models:
        p.error("no model to run")
    for name, m in models.items():
        m["mean_tokens"] = mean_tokens(m["dir"], m["data"])
        m["flops_per_token"] = flops_per_token(m["shape"], m["mean_tokens"])
        print(f"{name}: {m['dir']} ({m['shape'].trunk_matmul_params() / 1e6:.2f}M trunk matmul params), "
              f"{m['mean_tokens']:.1f} tokens per example", flush=True)

    tps: dict[str, list[float]] = {name: [] for name in models}
    peaks = []
    for r in range(args.rounds):
        for name, m in models.items():
            steps = run_sft(m["dir"], m["data"], work / f"run_{name}_{r}", args.steps,
                            args.batch_size, 256, seed=r, threads=args.threads)
            tps[name] += steps[1:]
            print(f"round {r + 1}/{args.rounds} {name:>12}: " + " ".join(f"{x:.0f}" for x in steps[1:])
                  + " tok/s", flush=True)
        peaks.append(matmul_peak_gflops(sizes=(1024, 1536, 2048), reps=6)["best"])
        print(f"round {r + 1}/{args.rounds}         peak: {peaks[-1]:.1f} GFLOP/s", flush=True)

    peak = median(peaks)
    results = []
    print(f"\nfp32 matmul peak: {peak:.1f} GFLOP/s (median of each round's best)")
    print(f"{'model':<14}{'tokens/s':>10}{'n':>4}{'tok/example':>13}{'GFLOP/s':>9}{'% peak':>8}")
    for name, m in models.items():
        med = median(tps[name])
        gflops = med * m["flops_per_token"] / 1e9
        results.append({"model": name, "dir": str(m["dir"]), "shape": asdict(m["shape"]),
                        "tokens_per_sec_median": med, "n_steps": len(tps[name]),
                        "tokens_per_sec": tps[name], "mean_tokens_per_example": m["mean_tokens"],
                        "gflop_per_token_train": m["flops_per_token"] / 1e9, "gflops": gflops,
                        "frac_of_peak": gflops / peak})
        print(f"{name:<14}{med:>10.0f}{len(tps[name]):>4}{m['mean_tokens']:>13.1f}{gflops:>9.2f}"
              f"{100 * gflops / peak:>7.1f}%")
    write_json(args.output, {"benchmark": "sft_throughput", "wall_s": time.time() - t_start,
                             "rounds": args.rounds, "steps_per_run": args.steps,
                             "batch_size": args.batch_size, "threads": args.threads, "peak_gflops": peak, "peak_by_round": peaks,
                             "results": results, "machine": machine_info()})
    print(f"\nwrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
