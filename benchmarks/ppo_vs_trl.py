"""PPO iteration speed: TRL's PPOTrainer against tether's PPO, in one run, on one machine.

    .venv/bin/python benchmarks/ppo_vs_trl.py [--rounds 5] [--iters-per-round 2]
        [--modes trl,separate,head] [--output benchmarks/results/ppo_vs_trl.json] [--profile]

Both sides get the same locally built Llama (policy = reference), the same reward model, a
critic initialised from that reward model, the same prompts and the same PPO settings (see
`Settings`). Each side lives in its own worker process, built once; rounds interleave the sides
(TRL k iterations, tether --critic separate k iterations, tether --critic head k iterations, a
matmul peak measurement, next round ...) because this machine's speed drifts. Each side's
number is the median over all its measured iterations; each worker's first iteration is a
warm-up and is not measured.

Model work per iteration is counted analytically, phase by phase, from what each side's code
does (`trl_work`, `tether_work`, conventions in bench_utils) and divided by the median seconds
per iteration: GFLOP/s, also as a fraction of this machine's fp32 matmul peak measured in the
same run. See benchmarks/README.md for how to read the output.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import tempfile
import time
import traceback
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from bench_utils import (SPECIAL_IDS, LlamaShape, build_policy, build_reward_model,  # noqa: E402
                         forward_flops, generation_flops, machine_info, matmul_peak_gflops, median,
                         synthetic_prompts, write_json)

REPO = Path(__file__).resolve().parent.parent
ALL_MODES = ("trl", "separate", "head")
SIDE_NAMES = {"trl": "TRL PPOTrainer", "separate": "tether --critic separate",
              "head": "tether --critic head"}


@dataclass(frozen=True)
class Settings:
    """The PPO settings both sides run with."""

    rollouts: int = 16  # prompts (= responses) per iteration
    prompt_len: int = 16  # tokens per prompt, <bos> included; all prompts have this length
    response_len: int = 32  # tokens per response: the model cannot emit EOS (no early stop)
    ppo_epochs: int = 4
    mini_batch: int = 16  # one minibatch per epoch
    temperature: float = 1.0
    policy_lr: float = 1e-6
    value_lr: float = 1e-5
    adam_eps: float = 1e-5
    kl_coef: float = 0.05
    vf_coef: float = 0.1
    seed: int = 0
    n_prompts: int = 256  # size of the prompt set (iterations cycle over it)


# ----------------------------------------------------------------------------- models and data


def build_assets(work: Path, shape: LlamaShape, s: Settings) -> dict[str, str]:
    """Policy (= SFT = reference) dir, reward-model dir, prompts .jsonl. Built once per run."""
    policy = build_policy(shape, work / "policy", seed=s.seed)
    rm = build_reward_model(policy, work / "reward_model", seed=s.seed)
    prompts = work / "prompts.jsonl"
    # prompt_len - 1 words: the tokenizer puts <bos> in front, so each prompt is prompt_len ids
    texts = synthetic_prompts(s.n_prompts, s.prompt_len - 1, shape.vocab, seed=s.seed)
    with prompts.open("w") as f:
        for t in texts:
            f.write(json.dumps({"prompt": t}) + "\n")
    return {"policy": str(policy), "reward_model": str(rm), "prompts": str(prompts)}


# ----------------------------------------------------------------------------- FLOP accounting


def trl_work(shape: LlamaShape, s: Settings) -> dict[str, float]:
    """Model FLOPs of one iteration of TRL 1.12's experimental PPOTrainer, by phase.

    * generation: `policy.generate` with a KV cache (prefill logits for the last position only).
      pi_old logprobs come from generate's scores, so TRL runs NO separate policy scoring pass;
    * scoring (no grad): reference forward with the LM head on all P+T positions; critic
      forward (`get_reward` on the value model: trunk + scalar head everywhere); RM forward (same);
    * update, per epoch (one minibatch): `PolicyAndValueWrapper` = policy forward with the LM
      head on all P+T positions + critic trunk and head; backward = 2x forward for both.
    """
    n, seq = s.rollouts, s.prompt_len + s.response_len
    fwd_policy = forward_flops(shape, n, seq, "lm")
    fwd_scalar = forward_flops(shape, n, seq, "scalar")
    return {
        "generation": generation_flops(shape, n, s.prompt_len, s.response_len),
        "score_reference": fwd_policy,
        "score_critic": fwd_scalar,
        "score_reward": fwd_scalar,
        "update_policy_fwd_bwd": s.ppo_epochs * 3 * fwd_policy,
        "update_critic_fwd_bwd": s.ppo_epochs * 3 * fwd_scalar,
    }


def tether_work(shape: LlamaShape, s: Settings, critic: str) -> dict[str, float]:
    """Model FLOPs of one tether PPO iteration (src/tether/recipes/online/loop.py `run_iteration`), by phase.

    * generation: `KVCacheSampler`, a KV-cache loop (prefill with logits_to_keep=1, then one
      one-token forward per further token): the same work as HF generate;
    * scoring (no grad): reference forward over P+T-1 tokens (the last column predicts nothing
      and is not fed) with the LM head on the T response-predicting positions only
      (`logits_to_keep`) and the last layer's query side there only (`tether.models.tail`);
      RM forward over all P+T tokens, its last layer's query side at the one position read;
    * pi_old and V_old: with one minibatch, the first epoch's forward gives them (no scoring pass
      of the policy or the critic);
    * update, per epoch: policy forward over P+T-1 tokens, LM head and the last layer's query
      side on T positions [+ with --critic separate, the critic's trunk over P+T-1 tokens, its
      last layer's query side on T positions, its scalar head everywhere; with --critic head, a d->1
      head on T positions of the policy's trunk]; backward = 2x forward;
    * health probe: `ReferenceProbe.check` re-scores 2 probe rows (prompt + 8 tokens, last
      column not fed, LM head and last layer's query side on 8 positions) with the reference
      every iteration.
    """
    n, seq, T = s.rollouts, s.prompt_len + s.response_len, s.response_len
    fwd_policy = forward_flops(shape, n, seq - 1, "lm", head_positions=T, last_layer_rows=T)
    fwd_critic = forward_flops(shape, n, seq - 1, "scalar", last_layer_rows=T)  # head everywhere
    work = {
        "generation": generation_flops(shape, n, s.prompt_len, s.response_len),
        "score_reference": fwd_policy,
        "score_reward": forward_flops(shape, n, seq, "scalar", head_positions=1, last_layer_rows=1),
        "update_policy_fwd_bwd": s.ppo_epochs * 3 * fwd_policy,
    }
    if critic == "separate":
        work["update_critic_fwd_bwd"] = s.ppo_epochs * 3 * fwd_critic
    else:  # the value head on the policy's trunk: d -> 1 per response position
        work["update_value_head"] = s.ppo_epochs * 3 * n * s.response_len * 2.0 * shape.hidden
    work["health_probe"] = forward_flops(shape, 2, s.prompt_len + 8 - 1, "lm", head_positions=8,
                                         last_layer_rows=8)
    return work


def total(work: dict[str, float]) -> float:
    return float(sum(work.values()))


# ----------------------------------------------------------------------------- phase timers


class PhaseTimers:
    """Wall time spent inside wrapped callables, summed per phase name."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = defaultdict(float)
        self.cpu: dict[str, float] = defaultdict(float)
        self._depth = 0

    def wrap(self, owner: Any, attr: str, phase: Callable[..., str] | str) -> None:
        original = getattr(owner, attr)

        def timed(*args: Any, **kwargs: Any) -> Any:
            if self._depth:  # nested in another timed call: billed to the outer one
                return original(*args, **kwargs)
            name = phase(*args, **kwargs) if callable(phase) else phase
            self._depth += 1
            t0, c0 = time.perf_counter(), time.process_time()
            try:
                return original(*args, **kwargs)
            finally:
                self.totals[name] += time.perf_counter() - t0
                self.cpu[name] += time.process_time() - c0
                self._depth -= 1

        setattr(owner, attr, timed)

    def reset(self) -> None:
        self.totals = defaultdict(float)
        self.cpu = defaultdict(float)


def torch_op_table(fn: Callable[[], Any], top: int = 15) -> list[dict[str, Any]]:
    """Run fn under torch.profiler (CPU) and return the top ops by self CPU time."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    all_self = sum(e.self_cpu_time_total for e in rows) or 1.0
    return [{"op": e.key, "self_s": e.self_cpu_time_total / 1e6, "calls": e.count,
             "share": e.self_cpu_time_total / all_self} for e in rows[:top]]


# ----------------------------------------------------------------------------- TRL side


class TRLSide:
    """A PPOTrainer built once; `run(k)` trains k more iterations and returns their seconds."""

    def __init__(self, assets: dict[str, str], s: Settings, work: Path):
        from datasets import Dataset
        from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification,
                                  AutoTokenizer, TrainerCallback)
        from transformers.trainer_callback import PrinterCallback, ProgressCallback
        from trl.experimental.ppo import PPOConfig, PPOTrainer

        self.s = s
        tok = AutoTokenizer.from_pretrained(assets["policy"])
        texts = [json.loads(line)["prompt"] for line in Path(assets["prompts"]).read_text().splitlines()]
        ids = [tok(t)["input_ids"] for t in texts]
        bad = sorted({len(x) for x in ids if len(x) != s.prompt_len})
        if bad:
            raise RuntimeError(f"prompts must be {s.prompt_len} tokens, got lengths {bad}")
        dataset = Dataset.from_dict({"input_ids": ids})

        def load_lm():
            return AutoModelForCausalLM.from_pretrained(assets["policy"], dtype=torch.float32)

        def load_scalar():
            return AutoModelForSequenceClassification.from_pretrained(
                assets["reward_model"], num_labels=1, dtype=torch.float32)

        policy, ref, value, reward = load_lm(), load_lm(), load_scalar(), load_scalar()
        self.args = PPOConfig(
            output_dir=str(work / "trl_out"),
            per_device_train_batch_size=s.rollouts, gradient_accumulation_steps=1,
            num_mini_batches=s.rollouts // s.mini_batch, num_ppo_epochs=s.ppo_epochs,
            total_episodes=s.rollouts,  # re-set before each train() call
            local_rollout_forward_batch_size=s.rollouts,  # one generation/scoring batch
            response_length=s.response_len, temperature=s.temperature,
            stop_token=None, stop_token_id=None,  # no truncation (and the model cannot emit EOS)
            missing_eos_penalty=None, kl_coef=s.kl_coef, kl_estimator="k1", vf_coef=s.vf_coef,
            learning_rate=s.policy_lr, lr_scheduler_type="constant", warmup_steps=0,
            seed=s.seed,
            # no work beyond the iteration itself:
            num_sample_generations=0,  # no sample generation during training
            gradient_checkpointing=False,  # PPOConfig defaults it to True: recompute in backward
            bf16=False, fp16=False,  # PPOConfig defaults bf16=True; both sides run fp32
            eval_strategy="no", save_strategy="no", report_to="none",
            logging_steps=10**9, disable_tqdm=True, push_to_hub=False,
            dataloader_num_workers=0,
        )
        # The same learning rates as tether: policy and critic in separate AdamW param groups
        # (TRL's own optimizer would use one lr for both), eps 1e-5 as in the SPEC.
        optimizer = torch.optim.AdamW(
            [{"params": list(policy.parameters()), "lr": s.policy_lr},
             {"params": list(value.parameters()), "lr": s.value_lr}],
            eps=s.adam_eps, weight_decay=0.0)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)

        self.times: list[float] = []
        self.cpu_times: list[float] = []
        self.step_ends = 0

        class CountSteps(TrainerCallback):
            def on_step_end(cb, args, state, control, **kw):  # noqa: N805
                self.step_ends += 1

        self.trainer = PPOTrainer(
            args=self.args, processing_class=tok, model=policy, ref_model=ref, reward_model=reward,
            value_model=value, train_dataset=dataset, optimizers=(optimizer, scheduler),
            callbacks=[CountSteps()])
        for cb in (PrinterCallback, ProgressCallback):  # no per-step printing
            self.trainer.remove_callback(cb)
        self.tokenizer = tok

    def run(self, iters: int) -> list[float]:
        """Train `iters` iterations, each one a `train()` call of one iteration, timed whole.

        Timing whole calls rather than on_step_end intervals keeps all of TRL's per-iteration
        work in: its loop calls `gc.collect()` (and frees the rollout buffers) AFTER
        on_step_end. What a call adds beyond the iteration (a new dataloader iterator, seven
        zero tensors, the train_begin/end callbacks) takes well under a millisecond.
        """
        self.args.total_episodes = self.args.batch_size
        self.args.num_total_batches = 1
        out = []
        for _ in range(iters):
            before = self.step_ends
            t0, c0 = time.perf_counter(), time.process_time()
            self.trainer.train()
            out.append(time.perf_counter() - t0)
            self.cpu_times.append(time.process_time() - c0)
            if self.step_ends != before + 1:
                raise RuntimeError(f"TRL ran {self.step_ends - before} iterations, expected 1")
        self.times += out
        return out

    def check(self) -> dict[str, Any]:
        """Sample once with TRL's own generation code and settings: every response must have
        exactly response_len tokens, none of them special."""
        from transformers import GenerationConfig
        from trl.experimental.ppo.ppo_trainer import batch_generation

        cfg = GenerationConfig(max_new_tokens=self.args.response_length,
                               temperature=self.args.temperature + 1e-7, top_k=0.0, top_p=1.0,
                               do_sample=True)
        batch = next(iter(self.trainer.dataloader))["input_ids"]
        policy = self.trainer.accelerator.unwrap_model(self.trainer.model).policy
        qr, _ = batch_generation(policy, batch, batch.shape[0], self.tokenizer.pad_token_id, cfg)
        resp = qr[:, batch.shape[1]:]
        return {"prompt_shape": list(batch.shape), "response_shape": list(resp.shape),
                "special_tokens_sampled": int(torch.isin(resp, torch.tensor(SPECIAL_IDS)).sum())}

    def install_phase_timers(self) -> PhaseTimers:
        """Wrap the TRL functions that make up the phases of an iteration (profiling only)."""
        import gc

        import trl.experimental.ppo.ppo_trainer as ppo_mod

        timers = PhaseTimers()
        timers.wrap(ppo_mod, "batch_generation", "generation")
        timers.wrap(ppo_mod, "forward", lambda *a, **k: "update_forward" if torch.is_grad_enabled()
                    else "score_reference")
        timers.wrap(ppo_mod, "get_reward", "score_critic_and_reward")
        timers.wrap(self.trainer.accelerator, "backward", "update_backward")
        timers.wrap(self.trainer.optimizer, "step", "update_optimizer_step")
        timers.wrap(gc, "collect", "gc_collect")
        return timers

    def op_profile(self) -> dict[str, Any]:
        return {"top_ops": torch_op_table(lambda: self.run(1))}


# ----------------------------------------------------------------------------- tether side


class TetherSide:
    """tether's PPO components built once (`tether.recipes.online.loop.build`); `run(k)` times k calls of
    `run_iteration`, the whole of one iteration (rollout, score, rewards, GAE, update, KL
    control, health checks), from outside."""

    def __init__(self, assets: dict[str, str], s: Settings, work: Path, critic: str):
        from tether.config import PPOConfig
        from tether.recipes.online import loop as ppo

        self.s = s
        self.ppo = ppo
        self.cfg = PPOConfig(
            output_dir=str(work / f"tether_{critic}"), seed=s.seed,
            policy=assets["policy"], reward_model=assets["reward_model"], prompts=assets["prompts"],
            max_steps=10**6, batch_size=s.rollouts, mini_batch_size=s.mini_batch,
            ppo_epochs=s.ppo_epochs, response_length=s.response_len, max_prompt_length=s.prompt_len,
            temperature=s.temperature, lr=s.policy_lr, value_lr=s.value_lr, adam_eps=s.adam_eps,
            kl_coef=s.kl_coef, vf_coef=s.vf_coef, missing_eos_penalty=None, critic=critic,
            dtype="float32", generation_backend="torch", tensorboard=False, progress=False)
        self.cfg.validate()
        self.parts = ppo.build(self.cfg)
        self.step = 0
        self.cpu_times: list[float] = []
        self.internal: list[dict[str, float]] = []
        self.last = None

    def run(self, iters: int) -> list[float]:
        out = []
        for _ in range(iters):
            self.step += 1
            t0, c0 = time.perf_counter(), time.process_time()
            result = self.ppo.run_iteration(self.parts, self.step)
            out.append(time.perf_counter() - t0)
            self.cpu_times.append(time.process_time() - c0)
            self.last = result
            self.internal.append({k: v for k, v in result.metrics.items() if k.startswith("timing/")})
        return out

    def check(self) -> dict[str, Any]:
        """One iteration (the warm-up): every response must have exactly response_len tokens."""
        sec = self.run(1)[0]
        seqs = self.last.experience.seqs
        resp = seqs.response_ids
        return {"prompt_shape": [resp.shape[0], seqs.n_prompt], "response_shape": list(resp.shape),
                "response_tokens_masked_in": int(seqs.response_mask.sum()),
                "special_tokens_sampled": int(torch.isin(resp, torch.tensor(SPECIAL_IDS)).sum()),
                "warmup_s": sec}

    def install_phase_timers(self) -> PhaseTimers:
        """Wrap the tether functions that make up the phases of an iteration (profiling only)."""
        from tether.recipes.online import steps as ppo_steps
        from tether.recipes.online import update as ppo_update

        p = self.parts
        timers = PhaseTimers()
        timers.wrap(p.generator, "generate", "generation")
        timers.wrap(p.reference, "logprobs", lambda seqs, *a, **k: "score_reference"
                    if seqs.input_ids.shape[0] > 2 else "health_probe")
        timers.wrap(p.reward, "score", "score_reward")
        grad_phase = lambda *a, **k: "update_forward"  # noqa: E731
        timers.wrap(ppo_steps, "forward_policy", grad_phase)  # first epoch's forward (pi_old, V_old)
        timers.wrap(ppo_update, "forward_policy", grad_phase)  # epochs 2..n (the loss's own forward)
        timers.wrap(p.accelerator, "backward", "update_backward")
        timers.wrap(p.accelerator, "clip_grad_norm_", "update_clip_grad_norm")
        for opt in p.optimizers:
            timers.wrap(opt, "step", "update_optimizer_step")
        return timers

    def op_profile(self) -> dict[str, Any]:
        """A torch.profiler table of one iteration, and the heaviest tether functions of another
        (cProfile, cumulative time)."""
        import cProfile
        import pstats

        ops = torch_op_table(lambda: self.run(1))
        prof = cProfile.Profile()
        prof.enable()
        self.run(1)
        prof.disable()
        funcs = []
        for (file, line, name), (_, nc, tt, ct, _) in pstats.Stats(prof).stats.items():  # type: ignore[attr-defined]
            if "/tether/" in file:
                funcs.append({"func": f"{Path(file).name}:{line}:{name}", "cum_s": ct, "self_s": tt,
                              "calls": nc})
        funcs.sort(key=lambda r: r["cum_s"], reverse=True)
        return {"top_ops": ops, "top_tether_functions": funcs[:20]}

    def timing_metrics(self) -> list[dict[str, float]]:
        """tether's own timing/* metrics of every iteration run so far (warm-up included)."""
        return self.internal


# ----------------------------------------------------------------------------- workers


def _worker(mode: str, assets: dict[str, str], s: Settings, work: str, threads: int, conn: Any) -> None:
    """One side in its own process: build, then answer ("run", k) / ("profile",) / ("stop",)."""
    try:
        if threads > 0:
            torch.set_num_threads(threads)
        torch.manual_seed(s.seed)
        side: Any = (TRLSide(assets, s, Path(work)) if mode == "trl"
                     else TetherSide(assets, s, Path(work), mode))
        info = side.check()
        if mode == "trl":  # the warm-up iteration
            info["warmup_s"] = side.run(1)[0]
        info["torch_threads"] = torch.get_num_threads()
        conn.send(("ok", info))
        timers = None
        parent = os.getppid()
        while True:
            while not conn.poll(5.0):  # exit if the main process went away without saying so
                if os.getppid() != parent:
                    return
            cmd = conn.recv()
            if cmd[0] == "run":  # wall and CPU (process, all threads) seconds per iteration
                n0 = len(side.cpu_times)
                wall = side.run(cmd[1])
                conn.send(("ok", {"wall": wall, "cpu": side.cpu_times[n0:]}))
            elif cmd[0] == "phases":  # one iteration with phase timers: (seconds, phases)
                timers = timers or side.install_phase_timers()
                timers.reset()
                n0 = len(side.cpu_times)
                sec = side.run(1)[0]
                cpu_sec = side.cpu_times[n0]
                phases, phases_cpu = dict(timers.totals), dict(timers.cpu)
                phases["other"] = sec - sum(phases.values())
                phases_cpu["other"] = cpu_sec - sum(phases_cpu.values())
                conn.send(("ok", {"iteration_s": sec, "phases_s": phases, "iteration_cpu_s": cpu_sec,
                                  "phases_cpu_s": phases_cpu}))
            elif cmd[0] == "ops":
                conn.send(("ok", side.op_profile()))
            elif cmd[0] == "timing_metrics":
                conn.send(("ok", side.timing_metrics() if hasattr(side, "timing_metrics") else None))
            else:
                break
    except BaseException:  # noqa: BLE001 - report anything to the parent, then exit
        conn.send(("error", traceback.format_exc()))


class Worker:
    def __init__(self, mode: str, assets: dict[str, str], s: Settings, work: Path, threads: int):
        ctx = mp.get_context("spawn")
        self.mode = mode
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker, args=(mode, assets, s, str(work), threads, child),
                                daemon=True)
        self.proc.start()

    def _ask(self, *cmd: Any) -> Any:
        if cmd:
            self.conn.send(cmd)
        status, payload = self.conn.recv()
        if status != "ok":
            raise RuntimeError(f"{self.mode} worker failed:\n{payload}")
        return payload

    def ready(self) -> dict[str, Any]:
        return self._ask()

    def run(self, iters: int) -> dict[str, list[float]]:
        return self._ask("run", iters)

    def phases(self) -> dict[str, Any]:
        return self._ask("phases")

    def ops(self) -> dict[str, Any]:
        return self._ask("ops")

    def timing_metrics(self) -> Optional[list[dict[str, float]]]:
        return self._ask("timing_metrics")

    def stop(self) -> None:
        try:
            self.conn.send(("stop",))
        except OSError:
            pass
        self.proc.join(timeout=30)


# ----------------------------------------------------------------------------- report


def print_table(rows: list[dict[str, Any]], peak: dict[str, float]) -> None:
    print()
    print(f"fp32 matmul peak: {peak['median']:.1f} GFLOP/s (median over rounds of each round's best;"
          f" max seen {peak['max']:.1f})")
    head = (f"{'side':<26}{'s/iter':>8}{'n':>4}{'GFLOP/iter':>12}{'GFLOP/s':>9}{'% peak':>8}"
            f"{'TRL/this':>10}{'min s':>8}{'CPU s':>8}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['side']:<26}{r['median_s_per_iter']:>8.3f}{r['n_iters']:>4}"
              f"{r['gflop_per_iter']:>12.1f}{r['gflops']:>9.1f}{100 * r['frac_of_peak']:>7.1f}%"
              f"{r['ratio_trl_over_this']:>10.2f}{r['min_s_per_iter']:>8.2f}"
              f"{r['median_cpu_s_per_iter']:>8.2f}")


def summarize_profile(reps: list[dict[str, Any]], ops: dict[str, Any]) -> dict[str, Any]:
    """Median seconds per phase over the profiled iterations, plus the op tables."""
    names = sorted({k for r in reps for k in r["phases_s"]})
    phases = {k: median([r["phases_s"].get(k, 0.0) for r in reps]) for k in names}
    phases_cpu = {k: median([r["phases_cpu_s"].get(k, 0.0) for r in reps]) for k in names}
    return {"iteration_s_median": median([r["iteration_s"] for r in reps]), "phases_s_median": phases,
            "iteration_cpu_s_median": median([r["iteration_cpu_s"] for r in reps]),
            "phases_cpu_s_median": phases_cpu, "reps": reps, **ops}


def median_timing(rows: list[dict[str, float]]) -> dict[str, float]:
    names = sorted({k for r in rows for k in r})
    return {k: median([r[k] for r in rows if k in r]) for k in names}


def print_profile(mode: str, prof: dict[str, Any], timing: Optional[dict[str, float]]) -> None:
    n = len(prof["reps"])
    print(f"\nprofile: {SIDE_NAMES[mode]} (median of {n} profiled iterations: "
          f"{prof['iteration_s_median']:.2f}s wall, {prof['iteration_cpu_s_median']:.2f}s CPU)")
    phases, phases_cpu = prof["phases_s_median"], prof["phases_cpu_s_median"]
    whole, whole_cpu = sum(phases.values()) or 1.0, sum(phases_cpu.values()) or 1.0
    print(f"  {'phase':<26}{'wall':>9} {'share':>6}{'CPU':>10} {'share':>6}")
    for name, sec in sorted(phases.items(), key=lambda kv: -kv[1]):
        c = phases_cpu.get(name, 0.0)
        print(f"  {name:<26}{sec:>8.3f}s {100 * sec / whole:>5.1f}%{c:>9.3f}s {100 * c / whole_cpu:>5.1f}%")
    if timing:
        print("  tether's own timing/* (median over the measured iterations): " + ", ".join(
            f"{k.split('/')[-1]}={v:.3f}s" for k, v in timing.items()))
    print("  top torch ops by self CPU time (one profiled iteration):")
    for op in prof["top_ops"][:10]:
        print(f"    {op['op'][:48]:<48}{op['self_s']:>8.3f}s {100 * op['share']:>5.1f}% {op['calls']:>6} calls")


# ----------------------------------------------------------------------------- main


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    p.add_argument("--iters-per-round", type=int, default=2,
                   help="measured iterations per side per round (default 2)")
    p.add_argument("--modes", default="trl,separate,head",
                   help="comma-separated subset of trl,separate,head (default: all three)")
    p.add_argument("--output", default=str(REPO / "benchmarks" / "results" / "ppo_vs_trl.json"))
    p.add_argument("--workdir", default=None, help="where models and run dirs go (default: a temp dir)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads in every worker; 0 (default) leaves torch's default")
    p.add_argument("--profile", action="store_true",
                   help="after the rounds, profile each side: phases of --profile-reps interleaved "
                        "iterations, then one iteration's torch ops")
    p.add_argument("--profile-reps", type=int, default=3)
    args = p.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for m in modes:
        if m not in ALL_MODES:
            p.error(f"unknown mode {m!r}; choose from {', '.join(ALL_MODES)}")
    if args.rounds < 1 or args.iters_per_round < 1:
        p.error("--rounds and --iters-per-round must be >= 1")

    shape, s = LlamaShape(), Settings()
    if args.threads > 0:  # the peak is measured here, with the same threads as the sides
        torch.set_num_threads(args.threads)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="ppo_vs_trl_"))
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    assets = build_assets(work, shape, s)
    print(f"model: Llama hidden {shape.hidden}, {shape.layers} layers, {shape.heads} heads, "
          f"intermediate {shape.intermediate}, vocab {shape.vocab} "
          f"({shape.trunk_matmul_params() / 1e6:.2f}M trunk matmul params); files in {work}", flush=True)

    workers: dict[str, Worker] = {}
    checks: dict[str, Any] = {}
    try:
        for m in modes:  # built one at a time so that builds do not overlap
            workers[m] = Worker(m, assets, s, work, args.threads)
            checks[m] = workers[m].ready()
            print(f"{m:>8} ready: {checks[m]}", flush=True)
            bad = checks[m]["response_shape"] != [s.rollouts, s.response_len] or checks[m]["special_tokens_sampled"]
            if bad:
                raise RuntimeError(f"{m}: responses are not all {s.response_len} plain tokens: {checks[m]}")

        times: dict[str, list[float]] = {m: [] for m in modes}
        cpu: dict[str, list[float]] = {m: [] for m in modes}
        peaks: list[dict[str, Any]] = []
        loads: list[dict[str, Any]] = []
        for r in range(args.rounds):
            for m in modes:
                load = os.getloadavg()[0]
                got = workers[m].run(args.iters_per_round)
                times[m] += got["wall"]
                cpu[m] += got["cpu"]
                loads.append({"round": r + 1, "mode": m, "loadavg_1min": load})
                print(f"round {r + 1}/{args.rounds} {m:>8}: "
                      + " ".join(f"{w:.2f}s" for w in got["wall"]) + "  cpu "
                      + " ".join(f"{c:.2f}s" for c in got["cpu"]) + f"   (load {load:.1f})", flush=True)
            peaks.append(matmul_peak_gflops(sizes=(1024, 1536, 2048), reps=6))
            print(f"round {r + 1}/{args.rounds}     peak: {peaks[-1]['best']:.1f} GFLOP/s", flush=True)

        # tether's own phase clock over the measured iterations (its first one was the warm-up)
        timing = {m: median_timing(workers[m].timing_metrics()[1:]) for m in modes if m != "trl"}
        profiles: dict[str, Any] = {}
        if args.profile:
            reps: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
            for _ in range(args.profile_reps):  # interleaved, like the timed rounds
                for m in modes:
                    reps[m].append(workers[m].phases())
            for m in modes:
                profiles[m] = summarize_profile(reps[m], workers[m].ops())
                print_profile(m, profiles[m], timing.get(m))
    finally:
        for w in workers.values():
            w.stop()

    peak = {"median": median([pk["best"] for pk in peaks]), "max": max(pk["best"] for pk in peaks)}
    rows = []
    trl_sec = median(times["trl"]) if "trl" in times else float("nan")
    for m in modes:
        work_m = trl_work(shape, s) if m == "trl" else tether_work(shape, s, m)
        sec = median(times[m])
        gflop = total(work_m) / 1e9
        rows.append({"side": SIDE_NAMES[m], "mode": m, "median_s_per_iter": sec,
                     "min_s_per_iter": min(times[m]), "median_cpu_s_per_iter": median(cpu[m]),
                     "iter_cpu_seconds": cpu[m],
                     "n_iters": len(times[m]), "iter_seconds": times[m], "gflop_per_iter": gflop,
                     "gflops": gflop / sec, "frac_of_peak": gflop / sec / peak["median"],
                     "ratio_trl_over_this": trl_sec / sec,
                     "work_gflop_by_phase": {k: v / 1e9 for k, v in work_m.items()}})
    print_table(rows, peak)

    payload = {
        "benchmark": "ppo_vs_trl", "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t_start)),
        "wall_s": time.time() - t_start, "settings": asdict(s),
        "model": {**asdict(shape), "trunk_matmul_params": shape.trunk_matmul_params()},
        "rounds": args.rounds, "iters_per_round": args.iters_per_round, "threads": args.threads,
        "peak_gflops": peak, "peak_by_round": peaks, "loadavg": loads, "checks": checks,
        "results": rows, "tether_timing_median": timing, "profiles": profiles, "machine": machine_info(),
    }
    write_json(args.output, payload)
    print(f"\nwrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
