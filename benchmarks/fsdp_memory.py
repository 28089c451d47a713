"""Peak memory per process of `tether sft` on 2 processes: DDP (replicated) against --fsdp
(FSDP2, sharded), on a locally built Llama of about 70M parameters, with the analytic bytes.

Each side is one `accelerate launch --multi_gpu --num_processes 2` (gloo on CPUs); the peak
resident set of its largest process is read from the launcher's RUSAGE_CHILDREN. The sides run
one after the other, each --repeats times, and the medians are reported. On a GPU, the same
script measures host memory only.

    python benchmarks/fsdp_memory.py                  # ~70M parameters, 3 repeats per side
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
from bench_utils import LlamaShape, build_policy, synthetic_prompts, write_json  # noqa: E402


def training_rss_mb(out: Path) -> tuple[float, float]:
    """The largest process's resident memory at the last logged training step (train/rss_mb):
    after the full model each process loaded has been sharded (and returned to the OS, with
    TETHER_CPU_MALLOC=0) and before the final gather."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in rows if "train/rss_mb" in r][-1]
    return last["train/rss_mb"], last["train/state_mb"]


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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--output", default="benchmarks/results/fsdp_memory.json")
    a = p.parse_args(argv)
    heads = max(1, a.hidden // 64)
    shape = LlamaShape(hidden=a.hidden, layers=a.layers, heads=heads, kv_heads=heads,
                       intermediate=(8 * a.hidden // 3 + 15) // 16 * 16, vocab=a.vocab)
    work = Path(tempfile.mkdtemp(prefix="tether-fsdp-mem-"))
    model = build_policy(shape, work / "model", seed=0)
    import torch
    from transformers import AutoModelForCausalLM

    n_params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(model).parameters())
    texts = synthetic_prompts(64, 48, shape.vocab, seed=0)
    data = work / "sft.jsonl"
    data.write_text("".join(json.dumps({"prompt": t[:len(t) // 2], "completion": t[len(t) // 2:]}) + "\n"
                            for t in texts))
    common = ["--model", str(model), "--data", str(data), "--max-steps", str(a.steps), "--batch-size", "2",
              "--lr", "1e-4", "--eval-fraction", "0", "--no-progress", "--no-tensorboard", "--save-every", "1000",
              "--log-every", "1"]
    peaks: dict[str, list[float]] = {"ddp": [], "fsdp": []}
    steady: dict[str, list[float]] = {"ddp": [], "fsdp": []}
    state: dict[str, list[float]] = {"ddp": [], "fsdp": []}
    for r in range(a.repeats):
        for side in ("ddp", "fsdp"):
            out = work / f"{side}-{r}"
            peaks[side].append(peak_rss_mb(["sft", *common, "--output-dir", str(out),
                                            *(["--fsdp"] if side == "fsdp" else [])]))
            rss, held = training_rss_mb(out)
            steady[side].append(rss)
            state[side].append(held)
            print(f"repeat {r + 1}: {side} peak {peaks[side][-1]:.0f} MB, while training "
                  f"{rss:.0f} MB, weights + optimizer state {held:.0f} MB", flush=True)
    mb = n_params / 2**20
    analytic = {  # fp32 weights 4 B and AdamW's two moments 8 B per parameter (gradients, another
        "ddp": 12 * mb, "fsdp": 12 * mb / 2,  # 4 B, are freed after each step and not counted)
    }
    result = {"parameters": n_params, "torch": torch.__version__,
              "peak_rss_mb": {k: statistics.median(v) for k, v in peaks.items()}, "runs": peaks,
              "training_rss_mb": {k: statistics.median(v) for k, v in steady.items()}, "training_runs": steady,
              "state_mb": {k: statistics.median(v) for k, v in state.items()},
              "analytic_states_mb_per_process": analytic}
    print(json.dumps(result, indent=2))
    write_json(a.output, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
