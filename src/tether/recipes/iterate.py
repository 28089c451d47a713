"""`tether iterate`: iterated RLHF, in which the reward model is retrained on the policy's own
samples, round after round (online / iterated reward learning, a remedy for reward hacking: the
RM is shown what the policy now writes, including what it learned to exploit).

Each round N, under output_dir/round-N/:

 1. candidates.jsonl   K responses per prompt from the current policy (round 1: --policy, later
                       rounds: the previous round's PPO output), on prompts no earlier round used
 2. labels.jsonl       the labeler's rankings (the world's rater, an LM judge, or a person with
                       `tether label`: the run then stops, saying what to run, and a rerun with
                       --resume goes on once every candidate is labelled)
 3. rm/                a reward model trained from --reference on every label so far (--labels
                       plus every round's new labels, less a held-out share of each round's),
                       and its accuracy on this round's held-out labels before (the previous RM)
                       and after the retraining
 4. ppo/               PPO from the current policy against the new RM, the KL tied to
                       --reference (the SFT model) in every round

Prompts may be conversational (`data.prompts`): the policy samples them in its chat template, the
candidates and labels keep the messages, and the RM and an LM judge read them in their own
templates (the world's rater reads only the world's plain prompts).

Every step leaves a completion marker, so a rerun with --resume skips finished steps and resumes
an unfinished RM or PPO run from its checkpoint (`tether.training.rundir.skip_or_resume`, the rule
`tether run` and `tether demo` follow too). round-N/round.json and output_dir/iterate.json
hold the figures.
"""

from __future__ import annotations

import itertools
import json
import logging
import random
from pathlib import Path
from typing import Any, Optional, Sequence

from tether.config import IterateConfig, PPOConfig, RMConfig
from tether.data.prompts import Prompt, has_chats
from tether.errors import ConfigError
from tether.feedback.items import Item, read_items
from tether.feedback.labels import LabelFile, make_record
from tether.models.save import mark_complete
from tether.stages import run_stage
from tether.training.files import atomic_write_json, write_jsonl
from tether.training.rundir import prepare_rerun, skip_or_resume

log = logging.getLogger("tether")


def round_prompts(prompts: Sequence[Prompt], n: int, per_round: int, seed: int) -> list[Prompt]:
    """Round n's prompts: the n-th slice of one seeded permutation, so rounds use different
    prompts while there are enough (then they wrap around)."""
    order = list(range(len(prompts)))
    random.Random(f"iterate:{seed}").shuffle(order)
    start = (n - 1) * per_round
    return [prompts[order[(start + i) % len(order)]] for i in range(min(per_round, len(order)))]


def _done(rdir: Path, step: str) -> bool:
    path = rdir / "steps.json"
    return path.is_file() and step in json.loads(path.read_text())


def _mark(rdir: Path, step: str) -> None:
    """Record a finished step of a round (candidates, labels), atomically."""
    path = rdir / "steps.json"
    done = json.loads(path.read_text()) if path.is_file() else []
    atomic_write_json(path, done + [step])


def is_heldout(key: str, fraction: float) -> bool:
    """A fixed share of items, chosen by their key, is kept out of the RM's training."""
    return int(key[:8], 16) / 16 ** 8 < fraction


# ----------------------------------------------------------------------------- 1. candidates


def sample_candidates(cfg: IterateConfig, policy: str, prompts: list[Prompt], out: Path, seed: int) -> None:
    """K responses per prompt from `policy` (a conversation in its chat template) into
    candidates.jsonl, {prompt, responses}: the prompt as the prompts file gave it."""
    from tether.data.prompts import render_prompts
    from tether.eval.sampling import sample_responses
    from tether.models.load import disable_dropout, load_causal_lm, load_tokenizer

    tok = load_tokenizer(policy, cfg.trust_remote_code, padding_side="left")
    texts, chat = render_prompts(tok, prompts, cfg.prompts)
    model = load_causal_lm(policy, trust_remote_code=cfg.trust_remote_code).eval()
    disable_dropout(model)
    flat = sample_responses(model, tok, texts, n=cfg.k, chat=chat, max_new_tokens=cfg.response_length,
                            temperature=cfg.temperature, seed=seed, backend=cfg.generation_backend,
                            source=policy, trust_remote_code=cfg.trust_remote_code,
                            progress="sampling comparisons" if cfg.progress else "").responses
    rows = []
    for i, prompt in enumerate(prompts):
        group = list(dict.fromkeys(r for r in flat[i * cfg.k:(i + 1) * cfg.k] if r.strip()))
        if len(group) >= 2:  # nothing to compare in identical or empty samples
            rows.append({"prompt": prompt, "responses": group})
    if not rows:
        raise ConfigError(f"the policy {policy} gave no prompt two different non-empty responses; "
                          "raise --temperature or --response-length")
    log.info("iterate: %d of %d prompts have >= 2 distinct responses to compare", len(rows), len(prompts))
    write_jsonl(out / "candidates.jsonl", rows)
    _mark(out, "candidates")


# ----------------------------------------------------------------------------- 2. labels


def world_labels(items: Sequence[Item], seed: int) -> list[dict]:
    """The built-in world's noisy rater (Plackett-Luce over gold scores), gold kept beside."""
    from tether.world import score
    from tether.world.labeler import rank

    rng = random.Random(f"iterate-labels:{seed}")
    records = []
    for item in items:
        golds = [score(item.prompt, r) for r in item.responses]
        ranks = rank(golds, rng)
        decision = "tie" if len(set(ranks)) == 1 else ("chose" if item.k == 2 else "ranked")
        record = make_record(item, _dense(ranks), "world", decision)
        record["gold"] = golds
        records.append(record)
    return records


def _dense(ranks: Sequence[int]) -> list[int]:
    order = sorted(set(ranks))
    return [order.index(r) for r in ranks]


def judge_labels(cfg: IterateConfig, items: Sequence[Item]) -> list[dict]:
    """An LM judge's labels (tether judge's, both orders of every pair averaged); the items it
    could not judge (too long for it) are left out and counted."""
    from tether.config import JudgeConfig
    from tether.feedback.judge import Verdict, model_rater
    from tether.recipes.judge import make_judge

    rater = model_rater("judge", cfg.judge)
    judge = make_judge(JudgeConfig(judge=cfg.judge, trust_remote_code=cfg.trust_remote_code), rater)
    outcomes = judge(items)
    records = [make_record(item, o.ranks, rater, o.decision, confidence=o.confidence)
               for item, o in zip(items, outcomes) if isinstance(o, Verdict)]
    if len(records) < len(items):
        log.warning("iterate: the judge could not label %d of %d comparisons (too long for it)",
                    len(items) - len(records), len(items))
    return records


def label_round(cfg: IterateConfig, rdir: Path, seed: int) -> bool:
    """Label round-N/candidates.jsonl into round-N/labels.jsonl; False while a person still has
    candidates to label."""
    items = read_items(str(rdir / "candidates.jsonl"))
    labels = LabelFile(rdir / "labels.jsonl")
    if cfg.labeler == "human":
        done = {r["item"] for r in labels.read()}  # a skip is a person's decision too
        missing = [it for it in items if it.key not in done]
        if missing:
            print(f"tether iterate: {rdir.name}: {len(missing)} of {len(items)} comparisons "
                  f"await a person. Label them with\n  tether label --input {rdir / 'candidates.jsonl'} "
                  f"--output {rdir / 'labels.jsonl'}\nthen rerun this command with --resume.", flush=True)
            return False
    else:
        records = world_labels(items, seed) if cfg.labeler == "world" else judge_labels(cfg, items)
        write_jsonl(rdir / "labels.jsonl", records)
    _mark(rdir, "labels")
    return True


# ----------------------------------------------------------------------------- 3. reward model


def _preference_rows(source: str, tokenizer: Any) -> list[dict]:
    from tether.data.io import load_rows
    from tether.data.preference import read_preference_rows

    rows = read_preference_rows(load_rows(source), source, tokenizer=tokenizer)
    return [{k: r[k] for k in ("prompt", "responses", "ranks", "gold", "chat") if k in r} for r in rows]


def rendered_row(row: dict, tokenizer: Any) -> dict:
    """A label row as the RM's data files hold it: a conversation rendered with `tokenizer`'s
    chat template (as tether rm would render it) and marked `chat`, so that rows of every
    source, --labels among them, share one file (a JSON lines column holds one type)."""
    from tether.data.preference import render_for_scoring

    if isinstance(row["prompt"], str):
        return row
    prompt, responses, _ = render_for_scoring(tokenizer, row["prompt"], row["responses"])
    return {**row, "prompt": prompt, "responses": responses, "chat": True}


def round_labels(rdir: Path, heldout: float) -> tuple[list[dict], list[dict]]:
    """Round N's usable labels (skips and ties left out), split into training and held-out."""
    train, held = [], []
    for r in LabelFile(rdir / "labels.jsonl").read():
        if r.get("decision") == "skip" or len(set(r["ranks"])) < 2:
            continue
        row = {k: r[k] for k in ("prompt", "responses", "ranks", "gold") if k in r}
        (held if is_heldout(r["item"], heldout) else train).append(row)
    return train, held


def pair_accuracy(rm_dir: str, rows: Sequence[dict], max_length: int, gold: bool = False) -> Optional[float]:
    """The share of ranked response pairs (ties left out) the RM orders as the labels do, or as
    the gold scores do with gold=True."""
    from tether.models.load import load_tokenizer
    from tether.models.reward import load_reward_model, score_texts

    key = "gold" if gold else "ranks"
    rows = [r for r in rows if key in r]
    if not rows:
        return None
    tok = load_tokenizer(rm_dir)
    model = load_reward_model(rm_dir, pad_token_id=tok.pad_token_id).eval()
    prompts = [r["prompt"] for r in rows for _ in r["responses"]]
    scores = iter(score_texts(model, tok, prompts, [x for r in rows for x in r["responses"]], 32, max_length))
    right = total = 0
    for r in rows:
        s = [next(scores) for _ in r["responses"]]
        truth = [-g for g in r["gold"]] if gold else r["ranks"]  # lower is better in both
        for i, j in itertools.combinations(range(len(s)), 2):
            if truth[i] == truth[j]:
                continue
            total += 1
            right += (s[i] > s[j]) == (truth[i] < truth[j])
    return right / total if total else None


def train_round_rm(cfg: IterateConfig, root: Path, n: int, reference: str, previous_rm: Optional[str]) -> dict:
    from tether.models.load import load_tokenizer

    rdir = root / f"round-{n}"
    tok = load_tokenizer(reference, cfg.trust_remote_code)
    data = [row for source in cfg.labels or [] for row in _preference_rows(source, tok)]
    for m in range(1, n + 1):
        data += round_labels(root / f"round-{m}", cfg.heldout_fraction)[0]
    held = round_labels(rdir, cfg.heldout_fraction)[1]  # this round's: the policy's newest samples
    out = rdir / "rm"
    action, rm_cfg = prepare_rerun(RMConfig(
        model=reference, data=str(rdir / "rm_data.jsonl"),
        eval_data=str(rdir / "rm_heldout.jsonl") if held else None, output_dir=str(out),
        max_steps=cfg.rm_steps, lr=cfg.rm_lr, batch_size=cfg.rm_batch_size, max_length=cfg.max_length,
        seed=cfg.seed + n, progress=cfg.progress, report_to=cfg.report_to,
        trust_remote_code=cfg.trust_remote_code))
    if action != "skip":  # (a finished RM keeps the data it was trained on as it is)
        write_jsonl(rdir / "rm_data.jsonl", [rendered_row(r, tok) for r in data])
        if held:
            write_jsonl(rdir / "rm_heldout.jsonl", [rendered_row(r, tok) for r in held])
        run_stage("rm", rm_cfg)
    figures = {"rm_train_rows": len(data), "rm_heldout_rows": len(held)}
    gold = cfg.gold_judge == "world"
    for name, rm_dir in (("before", previous_rm), ("after", str(out))):
        if rm_dir:
            figures[f"rm_accuracy_{name}"] = pair_accuracy(rm_dir, held, cfg.max_length)
            if gold:
                figures[f"rm_accuracy_gold_{name}"] = pair_accuracy(rm_dir, held, cfg.max_length, gold=True)
    return figures


# ----------------------------------------------------------------------------- 4. PPO


def run_round_ppo(cfg: IterateConfig, rdir: Path, n: int, policy: str, reference: str) -> None:
    action, ppo_cfg = prepare_rerun(PPOConfig(
        policy=policy, reference=reference if reference != policy else None,
        reward_model=str(rdir / "rm"), prompts=cfg.prompts, output_dir=str(rdir / "ppo"),
        max_steps=cfg.ppo_steps, batch_size=cfg.ppo_batch_size, response_length=cfg.response_length,
        temperature=cfg.temperature, lr=cfg.ppo_lr, kl_coef=cfg.kl_coef, critic=cfg.critic,
        value_lr=cfg.value_lr, vf_coef=cfg.vf_coef, gold_judge=cfg.gold_judge, seed=cfg.seed + n,
        generation_backend=cfg.generation_backend, progress=cfg.progress, report_to=cfg.report_to,
        trust_remote_code=cfg.trust_remote_code))
    if action != "skip":
        run_stage("ppo", ppo_cfg)


# ----------------------------------------------------------------------------- the rounds


def _claim(cfg: IterateConfig) -> Path:
    """The run directory: an earlier run's rounds continue only with --resume, and are removed
    first with --overwrite."""
    import shutil

    from tether.training.rundir import _compare_with_saved, claim, save_run_config

    root = claim(cfg)
    rounds = sorted(root.glob("round-*"))
    if rounds and cfg.overwrite:
        for r in rounds:
            shutil.rmtree(r)
        (root / "iterate.json").unlink(missing_ok=True)
    elif rounds and not cfg.resume:
        raise ConfigError(f"{root} holds rounds of an earlier tether iterate run. Pass --resume to "
                          "continue it, --overwrite to start again, or choose another --output-dir.")
    elif rounds:
        _compare_with_saved(cfg, root)
    save_run_config(cfg, root)
    return root


def run(cfg: IterateConfig) -> dict:
    from tether.data.prompts import read_prompts
    from tether.training.launch import setup_logging

    setup_logging()
    if cfg.generation_backend == "vllm":  # refused before the run directory is claimed
        from tether.rollout.vllm_engine import preflight

        preflight(cfg.policy, "auto", cfg.trust_remote_code)
    prompts = read_prompts(cfg.prompts)  # a bad file, too, before the run directory is claimed
    if has_chats(prompts) and "world" in (cfg.labeler, cfg.gold_judge):
        raise ConfigError("the built-in world's rater and gold judge read the world's plain string "
                          "prompts, not conversations: use --labeler judge or human, without "
                          "--gold-judge world")
    root = _claim(cfg)
    reference = cfg.reference or cfg.policy
    policy, previous_rm = cfg.policy, cfg.reward_model
    figures: list[dict] = []
    for n in range(1, cfg.rounds + 1):
        rdir = root / f"round-{n}"
        rdir.mkdir(exist_ok=True)
        if (rdir / "round.json").exists() and skip_or_resume(rdir / "ppo") == "skip":  # a finished round
            figures.append(json.loads((rdir / "round.json").read_text()))
            policy, previous_rm = str(rdir / "ppo"), str(rdir / "rm")
            continue
        log.info("iterate: ---- round %d of %d (policy %s) ----", n, cfg.rounds, policy)
        if not _done(rdir, "candidates"):
            sample_candidates(cfg, policy, round_prompts(prompts, n, cfg.prompts_per_round, cfg.seed),
                              rdir, cfg.seed + 1000 * n)
        if not _done(rdir, "labels") and not label_round(cfg, rdir, cfg.seed + n):
            summary = {"rounds": figures, "waiting_for_labels": str(rdir / "candidates.jsonl")}
            atomic_write_json(root / "iterate.json", summary)
            return summary
        round_figures = {"round": n, "policy": policy,
                         **train_round_rm(cfg, root, n, reference, previous_rm)}
        run_round_ppo(cfg, rdir, n, policy, reference)
        atomic_write_json(rdir / "round.json", round_figures)
        figures.append(round_figures)
        log.info("iterate: round %d: %s", n, ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                                      for k, v in round_figures.items() if k != "policy"))
        policy, previous_rm = str(rdir / "ppo"), str(rdir / "rm")
    summary = {"rounds": figures, "policy": policy, "reward_model": previous_rm}
    atomic_write_json(root / "iterate.json", summary)
    mark_complete(root, "iterate", {"final_policy": policy, "final_reward_model": previous_rm})
    return summary
