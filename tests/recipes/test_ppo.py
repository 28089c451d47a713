"""`tether ppo` end to end on a tiny Llama: it raises the reward, saves loadable models in every
variant, resumes exactly, exits cleanly on SIGTERM, and its health checks fire on injected faults."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import fields
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tether.cli import main
from tether.config import PPOConfig, from_dict
from tether.training.checkpoint import list_checkpoints
from tether.training.metrics import read_metrics

from conftest import write_jsonl

PROMPT = "Once upon a time, Lily saw a"
METRICS = ["objective/kl", "objective/kl_per_token", "objective/rm_score", "objective/rm_score_std",
           "objective/rlhf_reward", "objective/kl_coef", "objective/entropy", "response/length",
           "response/noncanonical_frac",
           "response/eos_rate", "response/distinct_2", "policy/loss", "policy/clipfrac",
           "policy/approx_kl", "val/loss", "val/explained_var", "val/clipfrac", "timing/rollout",
           "timing/score", "timing/update", "timing/iteration"]


@pytest.fixture(autouse=True, scope="module")
def one_thread(one_torch_thread):
    """Tiny models run faster on one thread (see conftest)."""


def _token_reward_model(policy_dir, out):
    """A hub-convention RM whose score is a fixed direction read off the LAST token's embedding.

    Its layers are made the identity (attention and MLP outputs zeroed), so the score of a
    sequence is u . norm(e[last token]); the embeddings are the policy's own LM-head rows, so a
    policy raises the score by moving its final hidden state toward u: learnable in a few steps.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tether.models.reward import init_reward_model

    tok = AutoTokenizer.from_pretrained(policy_dir)
    rm = init_reward_model(str(policy_dir), pad_token_id=0)
    lm_head = AutoModelForCausalLM.from_pretrained(policy_dir).lm_head.weight
    with torch.no_grad():
        for layer in rm.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        rm.model.embed_tokens.weight.copy_(lm_head)
        u = torch.randn(rm.config.hidden_size, generator=torch.Generator().manual_seed(1))
        rm.score.weight.copy_(u[None] / u.norm())
    rm.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def task(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("ppo_task")
    names = ["Lily", "Tom", "Sue", "Ben", "Max", "Ann"]
    prompts = [{"prompt": f"Once upon a time, {n} saw a"} for n in names * 4]
    ptx = [{"text": f"{n} saw a big red ball and was happy."} for n in names]
    return SimpleNamespace(policy=tiny_models["llama"], rm=_token_reward_model(tiny_models["llama"], root / "rm"),
                           prompts=write_jsonl(root / "prompts.jsonl", prompts),
                           ptx=write_jsonl(root / "ptx.jsonl", ptx))


def _args(task, out, *extra):
    return ["ppo", "--policy", str(task.policy), "--reward-model", str(task.rm), "--prompts",
            str(task.prompts), "--output-dir", str(out), "--batch-size", "8", "--response-length", "4",
            "--lr", "1e-2", "--value-lr", "1e-2", "--temperature", "1.0", "--samples-per-iteration", "2",
            "--no-progress", "--no-tensorboard", *extra]


def _config(task, out, **extra):
    values = dict(policy=str(task.policy), reward_model=str(task.rm), prompts=str(task.prompts),
                  output_dir=str(out), batch_size=8, response_length=4, lr=1e-2, value_lr=1e-2,
                  temperature=1.0, progress=False, tensorboard=False)
    return from_dict(PPOConfig, {**values, **extra})


def _outside_rm_score(model_dir, rm_dir, n=64, new_tokens=2):
    """Sample with plain transformers generate() and score with the plain RM (no tether code)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    rm = AutoModelForSequenceClassification.from_pretrained(rm_dir, num_labels=1).eval()
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    prompt = tok(PROMPT, return_tensors="pt").input_ids
    torch.manual_seed(0)
    out = model.generate(prompt.repeat(n, 1), do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                         max_new_tokens=new_tokens, pad_token_id=0)
    scores = []
    with torch.no_grad():
        for row in out[:, prompt.shape[1]:].tolist():
            cut = next((i for i, t in enumerate(row) if t in eos), len(row))  # the RM reads no EOS
            scores.append(rm(torch.tensor([prompt[0].tolist() + row[:cut]])).logits[0, 0].item())
    return sum(scores) / len(scores)


def test_cli_registers_ppo_and_its_help_lists_every_field(capsys):
    assert main(["ppo", "--help"]) == 0
    text = capsys.readouterr().out
    for f in fields(PPOConfig):
        assert f"--{f.name.replace('_', '-')} " in text, f.name
    assert main(["--help"]) == 0 and "ppo" in capsys.readouterr().out
    assert main(["ppo", "--output-dir", "x", "--policy", "p", "--prompts", "q"]) == 2  # no RM
    assert "--reward-model is required" in capsys.readouterr().err


def test_ppo_raises_the_reward_and_the_saved_policy_scores_higher_from_outside(task, tmp_path):
    from transformers import AutoModelForSequenceClassification

    out = tmp_path / "run"
    assert main(_args(task, out, "--max-steps", "20", "--batch-size", "32", "--response-length", "2",
                      "--kl-coef", "0.01", "--missing-eos-penalty", "none")) == 0
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 21))
    for name in METRICS:
        assert all(name in r for r in rows), name
    early = sum(r["objective/rm_score"] for r in rows[:4]) / 4
    late = sum(r["objective/rm_score"] for r in rows[-4:]) / 4
    assert late > early + 0.8, (early, late)
    assert abs(rows[0]["objective/kl"]) < 1e-4 < rows[-1]["objective/kl"]  # starts at pi_ref
    assert _outside_rm_score(out, task.rm) > _outside_rm_score(task.policy, task.rm) + 0.5
    samples = read_metrics(out / "samples.jsonl")
    assert len(samples) == 40 and set(samples[0]) >= {"step", "prompt", "response", "rm_score", "kl"}
    critic = AutoModelForSequenceClassification.from_pretrained(out / "critic", num_labels=1)
    assert critic.config.num_labels == 1
    assert (out / "tether_run.json").exists()


def test_head_critic_lora_minibatches_ptx_adaptive_kl_and_eval(task, tmp_path):
    from transformers import AutoModelForCausalLM

    from tether.models.critic import load_value_head

    out = tmp_path / "head"
    assert main(_args(task, out, "--max-steps", "2", "--critic", "head", "--lora-r", "4",
                      "--mini-batch-size", "4", "--ptx-data", str(task.ptx), "--kl-target", "0.5",
                      "--kl-horizon", "50", "--eval-prompts", str(task.prompts), "--whiten-rewards",
                      "--generation-backend", "hf")) == 0
    rows = read_metrics(out / "metrics.jsonl")
    assert "ptx/loss" in rows[-1] and "eval/rm_score" in rows[-1] and "eval/kl" in rows[-1]
    assert rows[1]["objective/kl_coef"] != rows[0]["objective/kl_coef"]  # adaptive beta moved
    model = AutoModelForCausalLM.from_pretrained(out)  # LoRA merged into plain weights
    assert not any("lora" in k for k in model.state_dict())
    model.generate(torch.tensor([[1, 5, 6]]), max_new_tokens=3, do_sample=False)
    head = load_value_head(out / "critic")
    assert head.in_features == model.config.hidden_size


def test_lora_reference_is_the_adapter_disabled_policy(task, tmp_path):
    from tether.recipes.online.loop import build, run_iteration

    parts = build(_config(task, tmp_path / "lora", lora_r=4, critic="head"))
    assert parts.reference.model is parts.policy_lm() and parts.reference.adapters_off
    first = run_iteration(parts, 1)
    assert abs(first.metrics["objective/kl"]) < 1e-4  # LoRA starts as a no-op
    second = run_iteration(parts, 2)
    assert abs(second.metrics["objective/kl"]) > 1e-3  # the adapters trained...
    assert not [i for i in first.issues + second.issues if i.check == "reference_changed"]  # ...pi_ref did not


def _comparable(row):
    return {k: v for k, v in row.items() if not k.startswith("timing/") and k != "memory/rss_mb"}  # measured


@pytest.mark.parametrize("schedule", [(), ("--lr-scheduler", "cosine", "--warmup-ratio", "0.1")])
def test_resume_reproduces_the_uninterrupted_metrics(task, tmp_path, schedule):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    extra = ("--max-steps", "5", "--kl-target", "1.0", "--kl-horizon", "100", *schedule)
    assert main(_args(task, full, *extra, "--save-every", "2", "--keep-checkpoints", "5")) == 0
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "step-2", resumed / "checkpoints" / "step-2")
    assert main(_args(task, resumed, *extra, "--resume")) == 0
    a, b = read_metrics(full / "metrics.jsonl"), read_metrics(resumed / "metrics.jsonl")
    assert [r["step"] for r in b] == [3, 4, 5]  # nothing before the checkpoint was re-run
    for x, y in zip(a[2:], b):
        assert _comparable(y) == pytest.approx(_comparable(x), rel=1e-6, abs=1e-7), x["step"]
    assert read_metrics(full / "samples.jsonl")[4:] == read_metrics(resumed / "samples.jsonl")


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(task, tmp_path):
    out = tmp_path / "run"
    args = _args(task, out, "--max-steps", "500", "--save-every", "1000")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "tether", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 2):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, output
    assert "--resume" in output and "Traceback" not in output
    (ckpt,) = list_checkpoints(out)
    assert 2 <= int(ckpt.name.split("-")[1]) < 500
    assert not (out / "model.safetensors").exists()  # no final model from an unfinished run


def test_a_reference_sharing_the_policys_parameters_aborts_the_run(task, tmp_path, monkeypatch, capsys):
    import tether.recipes.online.loop as ppo
    from tether.rollout.score import Reference

    real_build = ppo.build

    def sharing_build(cfg, accelerator=None):
        parts = real_build(cfg, accelerator)
        parts.reference = Reference(parts.policy_lm())  # the bug: pi_ref IS the policy
        return parts

    monkeypatch.setattr(ppo, "build", sharing_build)
    out = tmp_path / "shared"
    assert main(_args(task, out, "--max-steps", "3", "--health", "abort")) == 1
    assert "reference_changed" in capsys.readouterr().err
    assert list_checkpoints(out) == []  # the corrupted state was not checkpointed


@pytest.mark.parametrize("fault, message", [("flipped_sign", "wrong sign"),
                                            ("broadcast_score", "every response token")])
def test_faulty_reward_building_is_caught(task, tmp_path, fault, message):
    from tether.ops.advantages import kl_penalised_rewards
    from tether.recipes.online.loop import build, run_iteration

    def faulty(logprobs, ref_logprobs, scores, mask, kl_coef):
        if fault == "flipped_sign":
            return kl_penalised_rewards(ref_logprobs, logprobs, scores, mask, kl_coef)
        rewards, kl = kl_penalised_rewards(logprobs, ref_logprobs, torch.zeros_like(scores), mask, kl_coef)
        return torch.where(mask.bool(), rewards + scores[:, None], rewards), kl

    parts = build(_config(task, tmp_path / fault))
    parts.token_rewards = faulty
    issues = run_iteration(parts, 1).issues + run_iteration(parts, 2).issues  # KL is 0 at step 1
    assert any(i.check == "reward_layout" and message in i.message for i in issues), issues


def test_gold_judge_is_logged_each_iteration(tiny_models, tmp_path):
    """An outside judge (module:function) is scored on every iteration's responses."""
    import json

    from tether.cli import main

    from conftest import write_jsonl

    from tether.models.load import load_tokenizer
    from tether.models.reward import init_reward_model

    model, rm = tiny_models["llama"], tmp_path / "rm"
    init_reward_model(str(model), pad_token_id=0).save_pretrained(rm)
    load_tokenizer(str(model)).save_pretrained(rm)
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "the cat sat"}] * 8)
    out = tmp_path / "ppo_gold"
    assert main(["ppo", "--policy", str(model), "--reward-model", str(rm), "--prompts", str(prompts),
                 "--output-dir", str(out), "--max-steps", "2", "--batch-size", "4", "--response-length", "4",
                 "--critic", "head", "--gold-judge", "judges:length_judge", "--no-progress",
                 "--no-tensorboard"]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["objective/gold_score"] <= 0 for r in rows)
    assert any(r["objective/gold_score"] < 0 for r in rows)  # the judge really ran on the responses


def test_a_reward_model_with_another_tokenizer_scores_the_decoded_text(task, tiny_models, tmp_path, capsys):
    """A hub RM of another family (GPT-2 BPE vocabulary, policy Llama): PPO decodes each rollout
    and re-encodes it as the RM reads text, so every logged score is the RM's own score of the
    logged prompt and response."""
    from tether.models.load import load_tokenizer
    from tether.models.reward import init_reward_model, load_reward_model, score_texts

    rm_dir = tmp_path / "gpt2_rm"
    rm = init_reward_model(str(tiny_models["gpt2"]), pad_token_id=0, seed=3)
    rm.save_pretrained(rm_dir)
    load_tokenizer(str(tiny_models["gpt2"])).save_pretrained(rm_dir)
    args = _args(task, tmp_path / "x", "--reward-model", str(rm_dir), "--max-steps", "2",
                 "--samples-per-iteration", "8")
    assert main(args) == 2  # the default separate critic would start from an RM it cannot read
    assert "Use --critic head" in capsys.readouterr().err
    out = tmp_path / "run"
    assert main(_args(task, out, "--reward-model", str(rm_dir), "--max-steps", "2", "--critic", "head",
                      "--samples-per-iteration", "8")) == 0
    samples = read_metrics(out / "samples.jsonl")
    assert len(samples) == 16
    model, tok = load_reward_model(str(rm_dir)).eval(), load_tokenizer(str(rm_dir))
    again = score_texts(model, tok, [s["prompt"] for s in samples], [s["response"] for s in samples])
    assert again == pytest.approx([s["rm_score"] for s in samples], abs=1e-4)
    assert len({round(s, 4) for s in again}) > 1


def test_chat_prompts_reach_a_foreign_reward_model_in_its_own_chat_template(tiny_models, tmp_path):
    """Chat prompts, a ChatML policy, and an RM of another vocabulary with its own template: the
    RM reads each rollout rendered in ITS template, as `tether rm` renders conversational data."""
    from tether.data.preference import render_chat
    from tether.models.load import load_tokenizer
    from tether.models.reward import init_reward_model, load_reward_model, score_texts

    rm_dir = tmp_path / "rm"
    init_reward_model(str(tiny_models["gpt2"]), pad_token_id=0, seed=3).save_pretrained(rm_dir)
    rm_tok = load_tokenizer(str(tiny_models["gpt2"]))
    rm_tok.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                            "{% if add_generation_prompt %}assistant:{% endif %}")
    rm_tok.save_pretrained(rm_dir)
    questions = {f"what is a {w}": [{"role": "user", "content": f"what is a {w}"}]
                 for w in ("cat", "dog", "sun", "tree")}
    prompts = write_jsonl(tmp_path / "chat.jsonl", [{"messages": m} for m in questions.values()] * 2)
    out = tmp_path / "run"
    assert main(["ppo", "--policy", str(tiny_models["qwen2"]), "--reward-model", str(rm_dir),
                 "--prompts", str(prompts), "--output-dir", str(out), "--batch-size", "8",
                 "--response-length", "4", "--max-steps", "1", "--critic", "head",
                 "--samples-per-iteration", "8", "--no-progress", "--no-tensorboard"]) == 0
    policy_tok = load_tokenizer(str(tiny_models["qwen2"]))
    by_text = {policy_tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True): m
               for m in questions.values()}
    samples = read_metrics(out / "samples.jsonl")
    assert len(samples) == 8 and all(s["prompt"] in by_text for s in samples)
    rendered = [render_chat(rm_tok, by_text[s["prompt"]], [[{"role": "assistant", "content": s["response"]}]])
                for s in samples]
    assert all(p.startswith("user: what is a") and p.endswith("assistant:") for p, _ in rendered)
    model = load_reward_model(str(rm_dir)).eval()
    again = score_texts(model, rm_tok, [p for p, _ in rendered], [r[0] for _, r in rendered], chat=True)
    assert again == pytest.approx([s["rm_score"] for s in samples], abs=1e-4)


def _outside_text_rm_score(model_dir, rm_dir, n=64, new_tokens=2):
    """As `_outside_rm_score`, for an RM with its own tokenizer: the policy's sampled responses
    are decoded and the RM reads prompt + response re-encoded in its vocabulary."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    tok, rm_tok = AutoTokenizer.from_pretrained(model_dir), AutoTokenizer.from_pretrained(rm_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    rm = AutoModelForSequenceClassification.from_pretrained(rm_dir, num_labels=1).eval()
    prompt = tok(PROMPT, return_tensors="pt").input_ids
    torch.manual_seed(0)
    out = model.generate(prompt.repeat(n, 1), do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                         max_new_tokens=new_tokens, pad_token_id=tok.eos_token_id)
    rm_prompt = rm_tok(PROMPT)["input_ids"]
    scores = []
    with torch.no_grad():
        for row in out[:, prompt.shape[1]:]:
            text = tok.decode(row, skip_special_tokens=True)
            ids = rm_prompt + rm_tok(text, add_special_tokens=False)["input_ids"]
            scores.append(rm(torch.tensor([ids])).logits[0, 0].item())
    return sum(scores) / len(scores)


@pytest.mark.parametrize("arch", ["gpt2", "qwen2", "neox"])
def test_other_architectures_gain_against_a_reward_model_of_another_family(arch, task, tiny_models,
                                                                          tmp_path):
    """The hidden check's shape: a policy architecture, an RM and prompts that tether's own PPO
    tests were not written around (a GPT-2 / Qwen2 / GPT-NeoX policy with a byte-level BPE
    vocabulary, against the Llama RM with the stories vocabulary), and the gain measured from
    outside with plain transformers on the saved policy."""
    policy, out = tiny_models[arch], tmp_path / "run"
    assert main(["ppo", "--policy", str(policy), "--reward-model", str(task.rm), "--prompts",
                 str(task.prompts), "--output-dir", str(out), "--critic", "head", "--max-steps", "20",
                 "--batch-size", "32", "--response-length", "2", "--lr", "1e-2", "--value-lr", "1e-2",
                 "--temperature", "1.0", "--kl-coef", "0.01", "--missing-eos-penalty", "none",
                 "--no-progress", "--no-tensorboard"]) == 0
    rows = read_metrics(out / "metrics.jsonl")
    early = sum(r["objective/rm_score"] for r in rows[:4]) / 4
    late = sum(r["objective/rm_score"] for r in rows[-4:]) / 4
    before, after = _outside_text_rm_score(policy, task.rm), _outside_text_rm_score(out, task.rm)
    assert late > early + 0.3 and after > before + 0.3, (early, late, before, after)


def _tolerance(key, row, rows):
    """How far two runs that differ only in float rounding (batch shapes, reduction order) may
    log `key` apart. A clip fraction counts tokens: a ratio that sits on the clip boundary
    rounds to either side, so one token of the batch's response tokens (per update, averaged
    over the updates) may differ. Every other metric is a sum of floats: 1e-4 relative."""
    if key.endswith("clipfrac"):
        return dict(rel=0, abs=1.0 / (row["response/length"] * rows) + 1e-6)
    return dict(rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("extra", [(), ("--micro-batch-size", "2"), ("--critic", "head", "--ptx-coef", "0.5")])
def test_two_processes_match_one_process(task, tmp_path, extra):
    """DDP over gloo with 4 rollouts per process gives the metrics of one process with 8: the
    same prompts and sampling noise per row, advantages whitened over both processes, statistics
    averaged over them, losses weighted by each process's share of all response tokens (EOS ends
    some responses early), gradients all-reduced by DDP (with micro-batches, on the last
    backward of each minibatch only), and the held-out evaluation shared out between them. With PPO-ptx each process reads its share of the ptx
    batch, its LM loss divided by the mean ptx token count per process; that forward goes around
    the DDP wrapper but into the same backward, so DDP all-reduces its gradient too."""
    from tether.data.tokenize import encode_prompt
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(task.policy)
    names = ["Lily", "Tom", "Sue", "Ben", "Max", "Ann", "Tim", "Jack", "Amy", "Sam"]
    texts = [f"Once upon a time, {n} saw a" for n in names]
    lengths = [len(encode_prompt(tok, t)) for t in texts]
    same = [t for t, n in zip(texts, lengths) if n == max(set(lengths), key=lengths.count)]
    assert len(same) >= 2  # equal lengths: no prompt padding, which would differ per batch
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": t} for t in same * 8])
    # 11 held-out prompts: a global batch of 8, then 3 rows, all on the first process
    held_out = write_jsonl(tmp_path / "eval.jsonl", [{"prompt": t} for t in (same * 11)[:11]])
    one, two = tmp_path / "one", tmp_path / "two"
    if "--ptx-coef" in extra:
        extra = (*extra, "--ptx-data", str(task.ptx))

    def args(out, batch):
        return ["ppo", "--policy", str(task.policy), "--reward-model", str(task.rm), "--prompts",
                str(prompts), "--output-dir", str(out), "--batch-size", str(batch),
                "--response-length", "4", "--max-steps", "3", "--lr", "1e-2",
                "--value-lr", "1e-2", "--temperature", "1.0", "--gold-judge", "judges:length_judge",
                "--eval-prompts", str(held_out), "--eval-every", "2", "--no-progress",
                "--no-tensorboard", *extra]

    assert main(args(one, 8)) == 0
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--main_process_port", str(29500 + (os.getpid() + 250) % 500),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "-m", "tether", *args(two, 4)]
    tests = str(Path(__file__).resolve().parent.parent)  # where `judges` lives
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [tests, os.environ.get("PYTHONPATH")]))}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    a, b = read_metrics(one / "metrics.jsonl"), read_metrics(two / "metrics.jsonl")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3]
    # every metric: means over rollouts (each process holds as many), over tokens (weighted by
    # each process's share), and the batch-wide std, distinct-2 and explained variance
    compared = [k for k in METRICS if not k.startswith("timing/")] + ["objective/gold_score"]
    for ra, rb in zip(a, b):
        grad_norms = ["policy/grad_norm"] + ([] if "head" in extra else ["val/grad_norm"])
        evals = [k for k in ra if k.startswith("eval/")] if ra["step"] in (2, 3) else []
        for key in compared + grad_norms + evals + (["ptx/loss"] if "--ptx-coef" in extra else []):
            assert rb[key] == pytest.approx(ra[key], **_tolerance(key, ra, rows=8)), (ra["step"], key)
    assert any(0 < r["response/eos_rate"] < 1 for r in a)  # responses of different lengths
    assert a[2]["policy/loss"] != a[1]["policy/loss"]
    assert "eval/rm_score" in a[1] and a[1]["eval/rm_score"] != a[2]["eval/rm_score"]
    assert (two / "model.safetensors").exists()


@pytest.mark.parametrize("extra", [(), ("--mini-batch-size", "4"), ("--critic", "head", "--ptx-coef", "0.5")])
def test_micro_batches_give_the_update_of_the_whole_minibatch(task, tmp_path, extra):
    """Gradients accumulated over micro-batches of 2 rollouts, each weighted by its share of the
    response tokens (which differ per row: EOS ends some early), equal the minibatch's own."""
    if "--ptx-coef" in extra:
        extra = (*extra, "--ptx-data", str(task.ptx))
    whole, micro = tmp_path / "whole", tmp_path / "micro"
    assert main(_args(task, whole, "--max-steps", "3", *extra)) == 0
    assert main(_args(task, micro, "--max-steps", "3", "--micro-batch-size", "2", *extra)) == 0
    a, b = read_metrics(whole / "metrics.jsonl"), read_metrics(micro / "metrics.jsonl")
    assert any(0 < r["response/eos_rate"] < 1 for r in a)  # rows of different lengths
    keys = ["objective/kl", "objective/rm_score", "policy/loss", "val/loss", "policy/clipfrac",
            "policy/approx_kl", "val/clipfrac", "policy/grad_norm"] + (["ptx/loss"] if "--ptx-coef" in extra else [])
    for ra, rb in zip(a, b):
        for key in keys:
            assert rb[key] == pytest.approx(ra[key], **_tolerance(key, ra, rows=8)), (ra["step"], key)


def test_a_linear_schedule_anneals_both_learning_rates_to_zero(task, tmp_path):
    out = tmp_path / "run"
    assert main(_args(task, out, "--max-steps", "3", "--lr-scheduler", "linear")) == 0
    rows = read_metrics(out / "metrics.jsonl")
    # 3 iterations x 4 epochs x 1 minibatch = 12 steps at lr * (1 - i / 12); each iteration logs
    # the mean over its 4 steps: iteration 1 has i = 0..3, iteration 3 has i = 8..11
    expected = [sum(1 - i / 12 for i in range(4 * k, 4 * k + 4)) / 4 for k in range(3)]
    assert [r["policy/lr"] / 1e-2 for r in rows] == pytest.approx(expected, rel=1e-6)
    assert [r["val/lr"] / 1e-2 for r in rows] == pytest.approx(expected, rel=1e-6)
    state = json.loads(next((out / "checkpoints").glob("*/trainer_state.json")).read_text())
    assert len(state["schedulers"]) == 2  # the schedulers' state, as JSON
    constant = tmp_path / "constant"
    assert main(_args(task, constant, "--max-steps", "1")) == 0
    assert "policy/lr" not in read_metrics(constant / "metrics.jsonl")[0]  # no schedule, no state
    state = json.loads(next((constant / "checkpoints").glob("*/trainer_state.json")).read_text())
    assert state["schedulers"] == []
