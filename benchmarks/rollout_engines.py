"""Rollout throughput of tether's three generation backends on one model of realistic shape:
`torch` (tether's KV-cache sampler), `hf` (transformers' generate) and `vllm` (an engine in this
process, as `--generation-backend vllm` runs it).

The model is Qwen2-0.5B's architecture built from its config with random weights (hidden 896,
24 layers, 14 heads, 2 KV heads, MLP 4864, vocabulary 151,936, tied embeddings; --layers can
shorten it for a slow machine). Every engine samples the same prompts (--prompts of
--prompt-len random tokens) at temperature 1 with no EOS, so each row gets exactly --new-tokens
tokens. The engines alternate within each round, in an order rotated round by round, and the
medians over --rounds rounds are compared: tokens generated per second, the ratio to `torch`,
and the share of the machine's measured fp32 matmul peak (model FLOPs of a KV-cache generation,
the same for every engine).

For vLLM it also measures what a training run pays and sees:
- the cost of one weight sync (`VLLMGenerator.sync_weights`: every parameter streamed into the
  engine, then the probe check), median over rounds;
- the sampler-trainer mismatch on its samples: tether's forward of the same tokens in the same
  dtype against the logprobs vLLM reported (`ops/mismatch.py`).

Needs the vLLM environment (README, "vLLM"). On CPU: VLLM_ENABLE_V1_MULTIPROCESSING=0 is set
by tether.

    python benchmarks/rollout_engines.py                               # full shape, fp32 and bf16
    python benchmarks/rollout_engines.py --layers 4 --prompts 16 --new-tokens 64 --dtypes float32
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_utils import (LlamaShape, generation_flops, machine_info, matmul_peak_gflops,  # noqa: E402
                         median, write_json)

ENGINES = ("torch", "hf", "vllm")


def qwen2_half_b(layers: int) -> tuple[Any, LlamaShape]:
    from transformers import Qwen2Config

    config = Qwen2Config(hidden_size=896, intermediate_size=4864, num_hidden_layers=layers,
                         num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                         max_position_embeddings=32768, rope_theta=1_000_000.0, tie_word_embeddings=True,
                         architectures=["Qwen2ForCausalLM"])
    shape = LlamaShape(hidden=896, layers=layers, heads=14, kv_heads=2, intermediate=4864, vocab=151936,
                       tie_embeddings=True)
    return config, shape


def build(out: Path, layers: int) -> LlamaShape:
    from transformers import Qwen2ForCausalLM

    config, shape = qwen2_half_b(layers)
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(out)
    return shape


def trainer_logprobs(model: Any, rollout: Any) -> torch.Tensor:
    """tether's forward of the sampled tokens at temperature 1, chunked to bound the logits."""
    from tether.ops.logprobs import token_logprobs

    seqs = rollout.sequences()
    T = seqs.response_ids.shape[1]
    out = []
    with torch.no_grad():
        for rows in torch.arange(seqs.input_ids.shape[0]).split(8):
            part = seqs.rows(rows)
            logits = model(input_ids=part.input_ids, attention_mask=part.attention_mask,
                           position_ids=part.position_ids, logits_to_keep=T + 1).logits
            out.append(token_logprobs(logits[:, :T], part.response_ids, 1.0))
    return torch.cat(out)


def run_dtype(model_dir: Path, shape: LlamaShape, dtype: torch.dtype, args: argparse.Namespace,
              peak: float) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM

    from tether.ops.mismatch import mismatch_stats
    from tether.rollout.generate import HFGenerator, KVCacheSampler, SamplingParams
    from tether.rollout.vllm_engine import VLLMGenerator

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    params = SamplingParams(max_new_tokens=args.new_tokens, temperature=1.0, eos_token_ids=(), pad_token_id=0)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, shape.vocab, (args.prompts, args.prompt_len), generator=g)
    mask = torch.ones_like(ids)
    started = time.perf_counter()
    engines = {"torch": KVCacheSampler(model, params), "hf": HFGenerator(model, params),
               "vllm": VLLMGenerator(model, params, source=str(model_dir), dtype=dtype,
                                     max_model_len=args.prompt_len + args.new_tokens, seed=0)}
    vllm_start = time.perf_counter() - started
    flops = generation_flops(shape, args.prompts, args.prompt_len, args.new_tokens)
    tokens = args.prompts * args.new_tokens
    times: dict[str, list[float]] = {e: [] for e in ENGINES}
    syncs: list[float] = []
    last_vllm = None
    # a warm-up rollout per engine (the first vLLM call also sends the weights once)
    for name in ENGINES:
        engines[name].generate(ids[:2], mask[:2], torch.Generator().manual_seed(0))
    for r in range(args.rounds):
        order = ENGINES[r % 3:] + ENGINES[:r % 3]
        for name in order:
            t0 = time.perf_counter()
            rollout = engines[name].generate(ids, mask, torch.Generator().manual_seed(r))
            times[name].append(time.perf_counter() - t0)
            assert int(rollout.response_mask.sum()) == tokens, name
            if name == "vllm":
                last_vllm = rollout
        syncs.append(_timed(engines["vllm"].sync_weights))
        print(f"  {dtype} round {r + 1}: " + ", ".join(f"{n} {times[n][-1]:.2f} s" for n in ENGINES)
              + f", sync {syncs[-1]:.2f} s", flush=True)
    assert last_vllm is not None
    mismatch = {k.removeprefix("rollout/"): float(v) for k, v in mismatch_stats(
        trainer_logprobs(model, last_vllm), last_vllm.sampler_logprobs, last_vllm.response_mask).items()}
    engines["vllm"].close()
    result: dict[str, Any] = {"dtype": str(dtype).removeprefix("torch."), "vllm_start_seconds": vllm_start,
                              "engines": {}, "weight_sync_seconds": median(syncs), "weight_sync_all": syncs,
                              "mismatch": mismatch, "probe_after_last_sync": engines["vllm"].last_probe}
    base = median(times["torch"])
    for name in ENGINES:
        m = median(times[name])
        result["engines"][name] = {"median_seconds": m, "tokens_per_second": tokens / m,
                                   "vs_torch": base / m, "fp32_peak_share": flops / m / 1e9 / peak,
                                   "all_seconds": times[name]}
    return result


def _timed(fn: Any) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=24, help="decoder layers (Qwen2-0.5B has 24)")
    ap.add_argument("--prompts", type=int, default=64, help="prompts per rollout")
    ap.add_argument("--prompt-len", type=int, default=64, help="tokens per prompt")
    ap.add_argument("--new-tokens", type=int, default=128, help="tokens sampled per prompt")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds; medians are reported")
    ap.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated weight dtypes")
    ap.add_argument("--output", default="benchmarks/results/rollout_engines.json")
    args = ap.parse_args()
    peak = matmul_peak_gflops()["best"]
    print(f"fp32 matmul peak: {peak:.0f} GFLOP/s", flush=True)
    report: dict[str, Any] = {"machine": machine_info(), "fp32_peak_gflops": peak, "args": vars(args),
                              "results": []}
    with tempfile.TemporaryDirectory() as tmp:
        shape = build(Path(tmp) / "qwen2", args.layers)
        for name in args.dtypes.split(","):
            dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[name.strip()]
            report["results"].append(run_dtype(Path(tmp) / "qwen2", shape, dtype, args, peak))
    report["fp32_peak_gflops_after"] = matmul_peak_gflops()["best"]
    write_json(args.output, report)
    for res in report["results"]:
        print(f"\n{res['dtype']}: {args.prompts} prompts x {args.prompt_len} tokens, {args.new_tokens} new, "
              f"{args.layers} layers, medians of {args.rounds}")
        print(f"{'engine':8} {'tokens/s':>10} {'vs torch':>9} {'fp32 peak':>10}")
        for name, e in res["engines"].items():
            print(f"{name:8} {e['tokens_per_second']:10.1f} {e['vs_torch']:8.2f}x {e['fp32_peak_share']:9.1%}")
        print(f"weight sync {res['weight_sync_seconds']:.2f} s; mismatch |dlogp| {res['mismatch']['mismatch_abs']:.2e}"
              f" per token (max {res['mismatch']['mismatch_max']:.2e}), KL {res['mismatch']['mismatch_kl']:.2e}")
    print(f"\nwritten to {args.output}")


if __name__ == "__main__":
    main()
