"""`tether demo`: the whole pipeline in the built-in world, on a CPU, with no downloads.

 1. export the world's data (corpus, demonstrations, prompts) as JSONL
 2. pretrain the tiny base model on the world corpus
 3. SFT on the demonstrations
 4. sample four responses per prompt from the SFT model and rank them with the noisy labeler
 5. train the reward model on those rankings (K-wise loss)
 6. PPO at the default beta, and PPO at beta = 0 with a 3x larger policy step (the proxy chased hard)
 7. DPO on the same rankings (every ranked pair), and online DPO: pairs sampled from the policy
    as it trains, labelled by the reward model
 8. best-of-N from the SFT model
 9. the verifiable quiz: GRPO and RLOO against an exact-match reward function
 9c. a multi-turn task: questions only a lookup tool can answer (world/lookup.py), GRPO with
    the tool (tether grpo --env) and without it
10. judge every policy against SFT on held-out prompts with the gold judge
11. summary.json and the report

Every stage goes through the same data path and code a user's run does (JSONL files, the stage
configs, the recipes looked up in the stage registry). A rerun skips finished stages and resumes
an unfinished one (`tether.training.rundir.skip_or_resume`, as `tether run` does).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from tether.config import (BoNConfig, DemoConfig, DPOConfig, EvalConfig, GRPOConfig, OnlineDPOConfig,
                           PPOConfig, PretrainConfig, ReportConfig, RLOOConfig, RMConfig, SFTConfig)
from tether.stages import run_stage
from tether.training.files import atomic_write_json
from tether.training.rundir import prepare_rerun, skip_or_resume

log = logging.getLogger("tether")


@dataclass(frozen=True)
class Sizes:
    corpus: int
    pretrain_steps: int
    sft: int
    sft_steps: int
    pair_prompts: int
    pair_eval_prompts: int
    rm_steps: int
    ppo_steps: int
    ppo_beta0_steps: int  # beta = 0 over-optimises within ~10 iterations; more only costs time
    ppo_batch: int
    dpo_steps: int
    online_dpo_steps: int
    eval_prompts: int
    bon_n: int
    batch: int  # examples per step of the supervised stages
    response_length: int
    quiz_demos: int  # the verifiable quiz: demonstrations (40% wrong), questions, held-out ones
    quiz_questions: int
    quiz_eval: int
    quiz_sft_steps: int
    grpo_steps: int
    lookup_sft_steps: int  # the lookup task: SFT on demonstrations that call the tool half the time,
    lookup_grpo_steps: int  # then GRPO with and without the tool
    iterate_prompts: int  # prompts whose samples a later round of iterated RLHF ranks


FULL = Sizes(corpus=20000, pretrain_steps=400, sft=12000, sft_steps=1200, pair_prompts=3000,
             pair_eval_prompts=1000, rm_steps=300, ppo_steps=40, ppo_beta0_steps=25, ppo_batch=64, dpo_steps=100,
             online_dpo_steps=40,
             eval_prompts=200, bon_n=8, batch=32, response_length=48, quiz_demos=3000,
             quiz_questions=2000, quiz_eval=200, quiz_sft_steps=400, grpo_steps=120,
             lookup_sft_steps=300, lookup_grpo_steps=40, iterate_prompts=1000)
QUICK = Sizes(corpus=600, pretrain_steps=20, sft=200, sft_steps=8, pair_prompts=64,
              pair_eval_prompts=32, rm_steps=6, ppo_steps=3, ppo_beta0_steps=3, ppo_batch=8, dpo_steps=4,
              online_dpo_steps=3,
              eval_prompts=16, bon_n=2, batch=8, response_length=16, quiz_demos=64,
              quiz_questions=64, quiz_eval=16, quiz_sft_steps=4, grpo_steps=2,
              lookup_sft_steps=4, lookup_grpo_steps=2, iterate_prompts=24)


class Timer:
    """Wall time per demo stage, for the summary."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def run(self, name: str, out: Path, fn: Callable[[], Any], note: str = "") -> None:
        """Run a step unless its output is complete; `note` is logged when it does run."""
        if skip_or_resume(out) == "skip":
            log.info("demo: %s already complete in %s, skipping", name, out)
            return
        t0 = time.perf_counter()
        log.info("demo: ---- %s ----", name)
        if note:
            log.info("demo: %s", note)
        fn()
        self.seconds[name] = round(time.perf_counter() - t0, 1)

    def stage(self, name: str, stage: str, cfg: Any, note: str = "") -> None:
        """Run tether stage `stage` on `cfg` as the demo's step `name`, under the rerun rule:
        skipped when its output is complete, resumed when it holds checkpoints."""
        _, cfg = prepare_rerun(cfg)
        self.run(name, Path(cfg.output_dir), lambda: run_stage(stage, cfg), note)


# The RM's data are samples as the SFT model writes them at the demo's temperature (the policy
# PPO starts from, sampled as PPO samples it). A hotter second sample gives pairs that are easier
# to rank (90% RM accuracy with an earlier judge) but teaches the RM only fluent-vs-broken, which
# PPO's samples never are: see "Measured" in docs/world.md.
PPO_LR = 1e-4  # the default-beta run's policy learning rate
# The value head starts at zero on the policy's trunk, and must keep up with a policy that moves
# fast. Explained variance over 40 iterations, on two SFT/RM pairs (A and B, from two demo runs):
# value lr 1e-3, vf_coef 0.1: negative in 22 iterations (A), the health check flagged 11;
# 1e-2 and 0.5: negative in 8 (A) and 15 (B), flagged 0 and 7; 1e-2 and 1.0: negative in 4 and
# 9, flagged in none, with the same gold score (last 5 iterations: 1.66 against 1.62 for A).
PPO_VALUE_LR = 1e-2
PPO_VF_COEF = 1.0
BETA0_NOTE = ("the beta = 0 run chases the reward model with no KL tether, to show over-optimisation. "
              "Its health checks are expected to warn (reward rising while the KL explodes, and a "
              "critic that cannot follow a policy moving this fast); the run carries on.")
LOOKUP_TURN = 8  # tokens per policy turn of the lookup task (a call is 6 words and EOS)
LOOKUP_TOOL, LOOKUP_NO_TOOL = "tether.world.lookup:LookupEnv", "tether.world.lookup:NoToolEnv"
RANK_K = 4  # samples ranked per training prompt: C(4, 2) = 6 comparisons for one forward of 4


def make_preferences(sft_dir: Path, out: Path, sizes: Sizes, seed: int, temperature: float) -> None:
    """The RM's data, from the SFT model: `rankings.jsonl`, RANK_K samples per training prompt
    ranked by the noisy labeler (Plackett-Luce), as InstructGPT's labelers ranked 4-9 samples;
    `pairs_eval.jsonl`, two samples per held-out prompt, ordered by the same noisy labeler
    (Bradley-Terry) and carrying both gold scores, so that the RM's held-out accuracy is measured
    against the labels and against gold. Prompts whose two samples tie on gold are left out:
    there is no right answer to score there."""
    import random

    from tether.eval.sampling import sample_responses
    from tether.models.load import load_causal_lm, load_tokenizer
    from tether.models.save import mark_complete
    from tether.training.files import write_jsonl
    from tether.world import World, label_pairs, rank_responses, score

    tok = load_tokenizer(str(sft_dir), padding_side="left")
    model = load_causal_lm(str(sft_dir)).eval()
    world = World(seed)

    def sample(prompts: list[str], k: int, seed_offset: int) -> list[list[str]]:
        flat = sample_responses(model, tok, prompts, n=k, max_new_tokens=sizes.response_length,
                                temperature=temperature, seed=seed + seed_offset,
                                progress="sampling SFT").responses
        # the preference readers reject empty responses and repeated ones within a group
        return [list(dict.fromkeys(r for r in flat[i * k:(i + 1) * k] if r.strip()))
                for i in range(len(prompts))]

    prompts = world.prompts(sizes.pair_prompts, "train")
    rng = random.Random(f"demo-rankings:{seed}")
    rows = [rank_responses(p, group, rng) for p, group in zip(prompts, sample(prompts, RANK_K, 0))
            if len(group) >= 2]
    log.info("demo: rankings: %d prompts with 2-%d distinct samples (%d with fewer left out)",
             len(rows), RANK_K, len(prompts) - len(rows))
    write_jsonl(out / "rankings.jsonl", rows)

    prompts = world.prompts(sizes.pair_eval_prompts, "eval")
    kept = [(p, g) for p, g in zip(prompts, sample(prompts, 2, 1))
            if len(g) == 2 and score(p, g[0]) != score(p, g[1])]
    rows = label_pairs([p for p, _ in kept], [g[0] for _, g in kept], [g[1] for _, g in kept], seed)
    against_gold = sum(r["gold_chosen"] < r["gold_rejected"] for r in rows)
    log.info("demo: pairs_eval: %d labelled pairs, %d of them against gold (%d prompts whose "
             "samples tie on gold, repeat or are empty left out)", len(rows), against_gold,
             len(prompts) - len(rows))
    write_jsonl(out / "pairs_eval.jsonl", rows)
    mark_complete(out, "pairs", {})


def run(cfg: DemoConfig) -> dict:
    """Run every stage (skipping finished ones), then write summary.json and the report."""
    from tether.training.launch import setup_logging

    setup_logging()
    t_start = time.perf_counter()
    root, sizes, seed = Path(cfg.output_dir), QUICK if cfg.quick else FULL, cfg.seed
    root.mkdir(parents=True, exist_ok=True)
    d = {name: root / name for name in ("world", "base", "sft", "pairs", "rm", "ppo", "ppo_beta0",
                                        "dpo", "online_dpo", "bon", "quiz", "sft_quiz", "grpo", "rloo",
                                        "lookup", "sft_lookup", "grpo_no_tool", "grpo_tool", "eval")}
    timer = Timer()
    common = dict(seed=seed, progress=True, report_to="tensorboard")
    # 1. the world's data
    timer.run("world", d["world"], lambda: _export(d["world"], sizes, seed))
    # 2. base model
    timer.stage("pretrain", "pretrain", PretrainConfig(
        output_dir=str(d["base"]), corpus_docs=sizes.corpus, steps=sizes.pretrain_steps, seed=seed,
        batch_size=sizes.batch))
    # 3. SFT
    timer.stage("sft", "sft", SFTConfig(
        model=str(d["base"]), data=str(d["world"] / "sft.jsonl"), eval_data=str(d["world"] / "sft_eval.jsonl"),
        output_dir=str(d["sft"]), max_steps=sizes.sft_steps, lr=1e-3, batch_size=sizes.batch, max_length=128,
        **common))
    # 4. preference rankings of SFT samples
    timer.run("pairs", d["pairs"], lambda: make_preferences(d["sft"], d["pairs"], sizes, seed, cfg.temperature))
    # 5. reward model
    timer.stage("rm", "rm", RMConfig(
        model=str(d["sft"]), data=str(d["pairs"] / "rankings.jsonl"), eval_data=str(d["pairs"] / "pairs_eval.jsonl"),
        output_dir=str(d["rm"]), max_steps=sizes.rm_steps, lr=1e-3, batch_size=max(1, sizes.batch // 2), max_length=128,
        calibration_data=str(d["world"] / "sft.jsonl"), **common))
    # 6. PPO at the default beta and at beta = 0
    for name, beta, lr, steps in (("ppo", cfg.kl_coef, PPO_LR, sizes.ppo_steps),
                                  ("ppo_beta0", 0.0, cfg.beta0_lr, sizes.ppo_beta0_steps)):
        timer.stage(name, "ppo", PPOConfig(
            policy=str(d["sft"]), reward_model=str(d["rm"]), prompts=str(d["world"] / "prompts.jsonl"),
            output_dir=str(d[name]), max_steps=steps, batch_size=sizes.ppo_batch,
            response_length=sizes.response_length, temperature=cfg.temperature, lr=lr, kl_coef=beta,
            value_lr=PPO_VALUE_LR, vf_coef=PPO_VF_COEF, critic="head", gold_judge="world", **common),
            note=BETA0_NOTE if beta == 0.0 else "")
    # 7. DPO on the same rankings
    timer.stage("dpo", "dpo", DPOConfig(
        model=str(d["sft"]), data=str(d["pairs"] / "rankings.jsonl"), output_dir=str(d["dpo"]),
        max_steps=sizes.dpo_steps, lr=2e-4, batch_size=sizes.batch, max_length=128, beta=0.1, kl_samples=0,
        eval_fraction=0.0, **common))
    # 7b. online DPO: pairs sampled from the policy as it trains, labelled by the same RM (as many
    #     rollouts per iteration as PPO's, and PPO's learning rate)
    timer.stage("online_dpo", "online-dpo", OnlineDPOConfig(
        policy=str(d["sft"]), reward_model=str(d["rm"]), prompts=str(d["world"] / "prompts.jsonl"),
        output_dir=str(d["online_dpo"]), max_steps=sizes.online_dpo_steps, batch_size=sizes.ppo_batch // 2,
        response_length=sizes.response_length, temperature=cfg.temperature, lr=PPO_LR, beta=0.1,
        gold_judge="world", **common))
    # 8. best-of-N from the SFT model
    timer.stage("bon", "bon", BoNConfig(
        policy=str(d["sft"]), reward_model=str(d["rm"]), prompts=str(d["world"] / "prompts_eval.jsonl"),
        output_dir=str(d["bon"]), n=sizes.bon_n, max_prompts=sizes.eval_prompts, response_length=sizes.response_length,
        temperature=cfg.temperature, seed=seed))
    # 9. the verifiable quiz: SFT on demonstrations that are right 60% of the time, then GRPO and
    #    RLOO against the exact-match reward function (no reward model, no judge)
    timer.run("quiz", d["quiz"], lambda: _export_quiz(d["quiz"], sizes, seed))
    timer.stage("sft_quiz", "sft", SFTConfig(
        model=str(d["sft"]), data=str(d["quiz"] / "quiz_sft.jsonl"), output_dir=str(d["sft_quiz"]),
        max_steps=sizes.quiz_sft_steps, lr=5e-4, batch_size=sizes.batch, max_length=64, eval_fraction=0.0,
        **common))
    for name, config in (("grpo", GRPOConfig), ("rloo", RLOOConfig)):
        timer.stage(name, name, config(
            policy=str(d["sft_quiz"]), prompts=str(d["quiz"] / "quiz_prompts.jsonl"),
            reward_fn=["tether.world.quiz_reward:exact_match"], output_dir=str(d[name]),
            num_generations=8, batch_size=16, response_length=12, temperature=cfg.temperature,
            lr=5e-4, max_steps=sizes.grpo_steps, **common))
    # 9c. the lookup task (multi-turn): SFT on demonstrations that call the tool half of the
    #     time, then GRPO with the tool (episodes of up to two turns) and without it (one turn)
    timer.run("lookup", d["lookup"], lambda: _export_lookup(d["lookup"], sizes, seed))
    timer.stage("sft_lookup", "sft", SFTConfig(
        model=str(d["sft"]), data=str(d["lookup"] / "lookup_sft.jsonl"), output_dir=str(d["sft_lookup"]),
        max_steps=sizes.lookup_sft_steps, lr=5e-4, batch_size=sizes.batch, max_length=64, eval_fraction=0.0,
        **common))
    for name, env, turns in (("grpo_no_tool", LOOKUP_NO_TOOL, 1), ("grpo_tool", LOOKUP_TOOL, 2)):
        timer.stage(name, "grpo", GRPOConfig(
            policy=str(d["sft_lookup"]), prompts=str(d["lookup"] / "lookup_prompts.jsonl"), env=[env],
            max_turns=turns, output_dir=str(d[name]), num_generations=8, batch_size=16,
            response_length=LOOKUP_TURN, temperature=cfg.temperature, lr=5e-4,
            max_steps=sizes.lookup_grpo_steps, **common))
    # 9b. more rounds: the RM retrained on the last policy's samples, PPO from that policy
    last_round = _more_rounds(cfg, d, root, sizes, timer, common) if cfg.rounds > 1 else None
    # 10. gold-judged evaluation of every policy against SFT
    t0 = time.perf_counter()
    results = {}
    for name, policy in (("ppo", d["ppo"]), ("ppo_beta0", d["ppo_beta0"]), ("dpo", d["dpo"]),
                         ("online_dpo", d["online_dpo"]), ("bon", d["bon"] / "bon.jsonl")):
        results[name] = gold_eval(cfg, d, sizes, f"{name}_vs_sft", policy, d["sft"],
                                  reference=name != "bon")
    if last_round is not None:
        results.update(_evaluate_rounds(cfg, d, last_round, sizes))
    quiz_results = {name: quiz_exact_match(d[name], d["quiz"] / "quiz_eval.jsonl", cfg.temperature, seed + 1)
                    for name in ("sft_quiz", "grpo", "rloo")}
    atomic_write_json(d["eval"] / "quiz_exact_match.json", quiz_results)
    held_out = d["lookup"] / "lookup_eval.jsonl"
    lookup_results = {  # SFT and GRPO with the tool play with it; GRPO without it, without
        "sft": lookup_eval(d["sft_lookup"], held_out, LOOKUP_TOOL, 2, cfg.temperature, seed + 1),
        "grpo_no_tool": lookup_eval(d["grpo_no_tool"], held_out, LOOKUP_NO_TOOL, 1, cfg.temperature, seed + 1),
        "grpo_tool": lookup_eval(d["grpo_tool"], held_out, LOOKUP_TOOL, 2, cfg.temperature, seed + 1)}
    atomic_write_json(d["eval"] / "lookup_exact_match.json", lookup_results)
    timer.seconds["eval"] = round(time.perf_counter() - t0, 1)
    # 11. summary and report
    summary = _summary(d, results, timer, time.perf_counter() - t_start)
    summary.update({f"quiz_exact_match_{'sft' if n == 'sft_quiz' else n}": quiz_results[n] for n in quiz_results})
    for name, result in lookup_results.items():
        summary[f"lookup_exact_match_{name}"] = result["exact_match"]
    summary["lookup_tool_call_rate_sft"] = lookup_results["sft"]["tool_call_rate"]
    summary["lookup_tool_call_rate_grpo_tool"] = lookup_results["grpo_tool"]["tool_call_rate"]
    summary["kl_grpo"] = _last_metrics(d["grpo"]).get("objective/kl")
    summary["kl_rloo"] = _last_metrics(d["rloo"]).get("objective/kl")
    if last_round is not None:
        summary["iterated"] = _rounds_summary(d, results, summary)
    atomic_write_json(root / "summary.json", summary)
    from tether.report.html import build_report

    build_report(ReportConfig(run_dir=str(root)))
    _print_summary(summary)
    return summary


def _more_rounds(cfg: DemoConfig, d: dict, root: Path, sizes: Sizes, timer: Timer, common: dict) -> Path:
    """Rounds 2.. of iterated RLHF (tether iterate, starting from the default-beta PPO policy,
    the RM retrained from SFT on the rankings plus each round's new labels), then the beta = 0
    stress test against the last round's RM. Returns the last round's directory."""
    from tether.config import IterateConfig

    d["iterate"], d["ppo_beta0_last"] = root / "iterate", root / f"ppo_beta0_round{cfg.rounds}"
    # the directory holds rounds, not checkpoints: once it exists, iterate continues them (--resume)
    timer.stage("iterate", "iterate", IterateConfig(
        output_dir=str(d["iterate"]), policy=str(d["ppo"]), reference=str(d["sft"]),
        prompts=str(d["world"] / "prompts.jsonl"), labels=[str(d["pairs"] / "rankings.jsonl")],
        reward_model=str(d["rm"]), rounds=cfg.rounds - 1, prompts_per_round=sizes.iterate_prompts,
        k=RANK_K, labeler="world", gold_judge="world", rm_steps=sizes.rm_steps, rm_lr=1e-3,
        rm_batch_size=max(1, sizes.batch // 2), max_length=128, ppo_steps=sizes.ppo_steps,
        ppo_batch_size=sizes.ppo_batch, ppo_lr=PPO_LR, kl_coef=cfg.kl_coef, critic="head",
        value_lr=PPO_VALUE_LR, vf_coef=PPO_VF_COEF, response_length=sizes.response_length,
        temperature=cfg.temperature, seed=cfg.seed, resume=d["iterate"].exists(), progress=True,
        report_to="tensorboard"))
    last = d["iterate"] / f"round-{cfg.rounds - 1}"
    name = "ppo_beta0_last"
    timer.stage(f"ppo_beta0_round{cfg.rounds}", "ppo", PPOConfig(
        policy=str(d["sft"]), reward_model=str(last / "rm"), prompts=str(d["world"] / "prompts.jsonl"),
        output_dir=str(d[name]), max_steps=sizes.ppo_beta0_steps, batch_size=sizes.ppo_batch,
        response_length=sizes.response_length, temperature=cfg.temperature, lr=cfg.beta0_lr, kl_coef=0.0,
        value_lr=PPO_VALUE_LR, vf_coef=PPO_VF_COEF, critic="head", gold_judge="world", **common),
        note=BETA0_NOTE)
    return last


def gold_eval(cfg: DemoConfig, d: dict, sizes: Sizes, name: str, a: Path, b: Path,
              reference: bool = True) -> dict:
    """`tether eval` of a against b on the held-out prompts, judged by the gold judge (KL of a to
    SFT when a is a model); written to eval/<name>.json and printed."""
    from tether.recipes.evaluate import evaluate, print_table

    out = d["eval"] / f"{name}.json"
    result = evaluate(EvalConfig(
        policy_a=str(a), policy_b=str(b), prompts=str(d["world"] / "prompts_eval.jsonl"), judge="world",
        reference=str(d["sft"]) if reference else None, max_prompts=sizes.eval_prompts, output=str(out),
        response_length=sizes.response_length, temperature=cfg.temperature, seed=cfg.seed + 1))
    atomic_write_json(out, result)
    print(f"\n== {name.replace('_vs_', ' vs ')} ==")
    print_table(result)
    return result


def _evaluate_rounds(cfg: DemoConfig, d: dict, last: Path, sizes: Sizes) -> dict:
    """Gold-judged: the last round's policy against SFT and against round 1's policy, and the
    beta = 0 run against the last round's RM, against SFT."""
    return {name: gold_eval(cfg, d, sizes, name, a, b)
            for name, a, b in (("round_last", last / "ppo", d["sft"]),
                               ("round_last_vs_round1", last / "ppo", d["ppo"]),
                               ("ppo_beta0_last", d["ppo_beta0_last"], d["sft"]))}


def _rounds_summary(d: dict, results: dict, summary: dict) -> dict:
    """The iterated-RLHF figures: the RM on the last policy's samples before and after its
    retraining, the new round's gold against round 1's, and the beta = 0 stress test's gold
    loss (SFT gold minus the run's gold) against the first RM and against the last."""
    rounds = json.loads((d["iterate"] / "iterate.json").read_text())["rounds"]
    last = rounds[-1]
    gold_sft = summary["gold_sft"]
    loss_first = gold_sft - summary["gold_ppo_beta0"]
    loss_last = gold_sft - results["ppo_beta0_last"]["score_a_mean"]
    return {
        "rounds": 1 + len(rounds),
        "rm_accuracy_on_new_samples_before": last.get("rm_accuracy_before"),
        "rm_accuracy_on_new_samples_after": last.get("rm_accuracy_after"),
        "rm_accuracy_gold_on_new_samples_before": last.get("rm_accuracy_gold_before"),
        "rm_accuracy_gold_on_new_samples_after": last.get("rm_accuracy_gold_after"),
        "rm_heldout_pairs_from_new_samples": last.get("rm_heldout_rows"),
        "gold_round1": summary["gold_ppo"],
        "gold_last_round": results["round_last"]["score_a_mean"],
        "win_rate_last_round_vs_round1": results["round_last_vs_round1"]["win_rate"],
        "kl_last_round": results["round_last"].get("kl_a_to_reference"),
        "gold_ppo_beta0_first_rm": summary["gold_ppo_beta0"],
        "gold_ppo_beta0_last_rm": results["ppo_beta0_last"]["score_a_mean"],
        "beta0_gold_loss_first_rm": loss_first,
        "beta0_gold_loss_last_rm": loss_last,
        "beta0_gold_loss_ratio": loss_last / loss_first if loss_first else None,
    }


def _export(out: Path, sizes: Sizes, seed: int) -> None:
    from tether.models.save import mark_complete
    from tether.world import export

    export(str(out), seed=seed, n_corpus=sizes.corpus, n_sft=sizes.sft, n_sft_eval=max(50, sizes.sft // 10),
           n_pairs=50, n_pairs_eval=50, n_rankings=20, n_prompts=max(2000, sizes.pair_prompts),
           n_prompts_eval=sizes.eval_prompts)
    mark_complete(out, "world", {})


def _export_quiz(out: Path, sizes: Sizes, seed: int) -> None:
    from tether.models.save import mark_complete
    from tether.training.files import write_jsonl
    from tether.world import quiz

    write_jsonl(out / "quiz_sft.jsonl", quiz.demonstrations(sizes.quiz_demos, error_rate=0.4, seed=seed))
    write_jsonl(out / "quiz_prompts.jsonl", ({"prompt": q["prompt"], "answer": q["answer"]}
                                            for q in quiz.questions(sizes.quiz_questions, "train", seed + 1)))
    write_jsonl(out / "quiz_eval.jsonl", ({"prompt": q["prompt"], "answer": q["answer"]}
                                         for q in quiz.questions(sizes.quiz_eval, "eval", seed)))
    mark_complete(out, "quiz", {})


def _export_lookup(out: Path, sizes: Sizes, seed: int) -> None:
    from tether.models.save import mark_complete
    from tether.training.files import write_jsonl
    from tether.world import lookup

    write_jsonl(out / "lookup_sft.jsonl", lookup.demonstrations(sizes.quiz_demos, tool_rate=0.5, seed=seed))
    write_jsonl(out / "lookup_prompts.jsonl", lookup.questions(sizes.quiz_questions, "train", seed + 1))
    write_jsonl(out / "lookup_eval.jsonl", lookup.questions(sizes.quiz_eval, "eval", seed))
    mark_complete(out, "lookup", {})


def quiz_exact_match(model_dir: Path, questions: Path, temperature: float, seed: int) -> float:
    """The share of held-out quiz questions a policy answers exactly right, one sample each at
    the demo's temperature (the reward function is the judge)."""
    from tether.eval.sampling import sample_responses
    from tether.models.load import load_causal_lm, load_tokenizer
    from tether.training.metrics import read_metrics
    from tether.world.quiz_reward import exact_match

    rows = read_metrics(questions)
    tok = load_tokenizer(str(model_dir), padding_side="left")
    model = load_causal_lm(str(model_dir)).eval()
    samples = sample_responses(model, tok, [r["prompt"] for r in rows], n=1, max_new_tokens=12,
                               temperature=temperature, seed=seed)
    return sum(exact_match(None, samples.responses, [r["answer"] for r in rows])) / len(rows)


def _run_summary(path: Path) -> dict:
    marker = path / "tether_run.json"
    return json.loads(marker.read_text()) if marker.exists() else {}


def _last_metrics(path: Path) -> dict:
    from tether.training.metrics import read_metrics

    rows = read_metrics(path / "metrics.jsonl") if (path / "metrics.jsonl").exists() else []
    return rows[-1] if rows else {}


def _summary(d: dict[str, Path], results: dict, timer: Timer, wall: float) -> dict:
    rm_run = _run_summary(d["rm"])
    ppo_last = _last_metrics(d["ppo"])
    summary = {
        "rm_accuracy_gold": rm_run.get("eval/accuracy_gold"),
        "rm_accuracy_labels": rm_run.get("eval/accuracy"),
        "win_rate_ppo_vs_sft": results["ppo"]["win_rate"],
        "win_rate_dpo_vs_sft": results["dpo"]["win_rate"],
        "win_rate_online_dpo_vs_sft": results["online_dpo"]["win_rate"],
        "win_rate_bon_vs_sft": results["bon"]["win_rate"],
        "win_rate_ppo_beta0_vs_sft": results["ppo_beta0"]["win_rate"],
        "kl_ppo": results["ppo"].get("kl_a_to_reference"),
        "kl_ppo_beta0": results["ppo_beta0"].get("kl_a_to_reference"),
        "kl_dpo": results["dpo"].get("kl_a_to_reference"),
        "kl_online_dpo": results["online_dpo"].get("kl_a_to_reference"),
        "gold_ppo": results["ppo"]["score_a_mean"],
        "gold_ppo_beta0": results["ppo_beta0"]["score_a_mean"],
        "gold_dpo": results["dpo"]["score_a_mean"],
        "gold_online_dpo": results["online_dpo"]["score_a_mean"],
        "gold_bon": results["bon"]["score_a_mean"],
        "gold_sft": results["ppo"]["score_b_mean"],
        "rm_score_ppo_final": ppo_last.get("objective/rm_score"),
        "rm_score_ppo_beta0_final": _last_metrics(d["ppo_beta0"]).get("objective/rm_score"),
        "base_heldout_perplexity": _run_summary(d["base"]).get("heldout_perplexity"),
        "wall_seconds": round(wall, 1),
        "stage_seconds": timer.seconds,
        "win_rates": {name: {k: results[name][k] for k in ("win_rate", "ci95_low", "ci95_high")}
                      for name in ("bon", "dpo", "online_dpo", "ppo", "ppo_beta0")},
    }
    return summary


def _print_summary(summary: dict) -> None:
    print("\n==================== tether demo summary ====================")
    for key, value in summary.items():
        if isinstance(value, float):
            print(f"  {key:<28} {value:.4g}")
        elif isinstance(value, (int, str)) or value is None:
            print(f"  {key:<28} {value}")
    if "iterated" in summary:
        print("  iterated RLHF:")
        for key, value in summary["iterated"].items():
            print(f"    {key:<40} {value:.4g}" if isinstance(value, float) else f"    {key:<40} {value}")
    print("  stage seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in summary["stage_seconds"].items()))


def lookup_eval(model_dir: Path, questions: Path, env: str, max_turns: int, temperature: float,
                seed: int) -> dict:
    """The held-out lookup questions played out with `env` (the tool, or none): exact match
    (the environment's reward) and the share of episodes that called the tool, one sample
    each at the demo's temperature, from the saved model with plain transformers and the
    episode runner the trainer samples with."""
    import torch

    from tether.data.tokenize import encode_prompt
    from tether.envs.api import load_environments
    from tether.envs.episodes import EpisodeLimits, EpisodeRunner, generator_turns
    from tether.models.load import eos_token_ids, load_causal_lm, load_tokenizer
    from tether.rollout.generate import KVCacheSampler, SamplingParams
    from tether.training.metrics import read_metrics

    rows = read_metrics(questions)
    tok = load_tokenizer(str(model_dir), padding_side="left")
    model = load_causal_lm(str(model_dir)).eval()
    eos = tuple(eos_token_ids(tok, model))
    sampler = KVCacheSampler(model, SamplingParams(LOOKUP_TURN, temperature, eos_token_ids=eos,
                                                   pad_token_id=tok.pad_token_id))
    runner = EpisodeRunner(load_environments([env]), tok, eos, tok.pad_token_id,
                           EpisodeLimits(max_turns, LOOKUP_TURN * max_turns, LOOKUP_TURN))
    rng = lambda turn: torch.Generator().manual_seed(seed * 1_000_003 + turn)  # noqa: E731
    prompts = [encode_prompt(tok, r["prompt"]) for r in rows]  # as the online stages encode them
    out = runner.run(prompts, rows, [f"{questions}:{i + 1}" for i in range(len(rows))], [False] * len(rows),
                     generator_turns(sampler, eos, tok.pad_token_id, "cpu", rng))
    runner.close()
    n = len(out.episodes)
    return {"exact_match": sum(e.reward for e in out.episodes) / n,
            "tool_call_rate": sum(e.tool_calls > 0 for e in out.episodes) / n}
