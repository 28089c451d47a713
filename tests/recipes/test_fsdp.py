"""`--fsdp` (sft, rm, dpo, ppo, grpo, online-dpo): torch FSDP2 over two CPU processes (gloo), against one process."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import story_rows, write_jsonl
from tether.cli import main
from tether.training.metrics import read_metrics

pytestmark = pytest.mark.slow


def _args(model, data, out, *extra):
    return ["sft", "--model", str(model), "--data", str(data), "--output-dir", str(out), "--lr", "1e-3",
            "--no-progress", "--no-tensorboard", "--eval-fraction", "0.1", *extra]


def _launch(*args):
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--main_process_port", str(29500 + (os.getpid() + len(args)) % 500), "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "tether", *args]
    done = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def _rows(out):
    return {r["step"]: r for r in read_metrics(out / "metrics.jsonl")}


def _without_dropout(src, dst):
    """A copy of the model with every dropout probability at 0: dropout masks are drawn per
    process, so with dropout no two launches of different sizes could agree."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(src)
    for key, value in list(config.to_dict().items()):
        if isinstance(value, float) and ("dropout" in key or "pdrop" in key):
            setattr(config, key, 0.0)
    AutoModelForCausalLM.from_pretrained(src, config=config).save_pretrained(dst)
    AutoTokenizer.from_pretrained(src).save_pretrained(dst)
    return dst


@pytest.mark.parametrize("arch", ["llama", "gpt2", "neox"])
def test_two_sharded_processes_match_one_and_save_one_plain_model(tiny_models, tmp_path, arch):
    from transformers import AutoModelForCausalLM

    data = write_jsonl(tmp_path / "d.jsonl", story_rows(40))
    one, two = tmp_path / "one", tmp_path / "two"
    model = _without_dropout(tiny_models[arch], tmp_path / "model")
    assert main(_args(model, data, one, "--max-steps", "4", "--batch-size", "4")) == 0
    _launch(*_args(model, data, two, "--max-steps", "4", "--batch-size", "2", "--fsdp"))
    a, b = _rows(one), _rows(two)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    # float error only: the same global batch, gradients reduced in another order
    for step in a:
        for key in ("train/loss", "train/grad_norm"):
            assert b[step][key] == pytest.approx(a[step][key], rel=1e-4), (step, key)
    assert b[4]["eval/loss"] == pytest.approx(a[4]["eval/loss"], rel=1e-4)
    ckpt = two / "checkpoints" / "step-4"
    assert {p.name for p in ckpt.glob("shard-*")} == {"shard-0-of-2.safetensors", "shard-1-of-2.safetensors"}
    assert not list(ckpt.glob("*.pkl")) and not list(ckpt.glob("*.bin"))
    # the final model is one ordinary directory: plain transformers loads it in one process,
    # and it computes what the one-process model computes
    ids = torch.tensor([[1, 5, 9, 14, 3, 7]])
    with torch.no_grad():
        la = AutoModelForCausalLM.from_pretrained(one).eval()(ids).logits
        lb = AutoModelForCausalLM.from_pretrained(two).eval()(ids).logits
    assert torch.allclose(la, lb, atol=1e-4, rtol=1e-4)
    base = AutoModelForCausalLM.from_pretrained(model).eval()
    with torch.no_grad():
        assert not torch.allclose(base(ids).logits, lb, atol=1e-3)  # it trained


def test_a_sharded_run_resumes_exactly(tiny_models, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", story_rows(40))
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    common = ("--max-steps", "6", "--batch-size", "2", "--fsdp", "--keep-checkpoints", "5")
    _launch(*_args(tiny_models["llama"], data, full, *common, "--save-every", "3"))
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "step-3", resumed / "checkpoints" / "step-3")
    _launch(*_args(tiny_models["llama"], data, resumed, *common, "--save-every", "3", "--resume"))
    a, b = _rows(full), _rows(resumed)
    assert sorted(b) == [4, 5, 6]
    for step in b:
        assert b[step]["train/loss"] == pytest.approx(a[step]["train/loss"], rel=1e-6, abs=1e-7), step


def test_fsdp_is_refused_where_it_cannot_run(tiny_models, tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", story_rows(8))
    out = tmp_path / "one"
    assert main(_args(tiny_models["llama"], data, out, "--max-steps", "1", "--fsdp")) == 2
    assert "--num_processes N" in capsys.readouterr().err
    assert not out.exists()  # refused before anything was left behind
    assert main(_args(tiny_models["llama"], data, out, "--fsdp", "--lora-r", "4")) == 2
    assert "--fsdp cannot be combined with --lora-r" in capsys.readouterr().err
    assert main(["ppo", "--policy", str(tiny_models["llama"]), "--reward-model", str(tiny_models["llama"]),
                 "--prompts", str(data), "--output-dir", str(out), "--fsdp", "--lora-r", "4"]) == 2
    assert "--fsdp cannot be combined with --lora-r" in capsys.readouterr().err
    assert not out.exists()


def test_sharded_dpo_matches_one_process_and_samples_for_its_kl(tiny_models, tmp_path):
    rows = story_rows(24)
    pairs = write_jsonl(tmp_path / "p.jsonl", [{"prompt": r["prompt"], "chosen": r["completion"],
                                                "rejected": rows[(i + 1) % len(rows)]["completion"]}
                                               for i, r in enumerate(rows)])
    one, two = tmp_path / "one", tmp_path / "two"
    args = ("--model", str(tiny_models["llama"]), "--data", str(pairs), "--lr", "1e-3", "--max-steps", "3",
            "--no-progress", "--no-tensorboard", "--eval-fraction", "0.2", "--kl-samples", "4",
            "--kl-response-length", "6")
    assert main(["dpo", "--output-dir", str(one), "--batch-size", "4", *args]) == 0
    _launch("dpo", "--output-dir", str(two), "--batch-size", "2", "--fsdp", *args)
    a, b = _rows(one), _rows(two)
    for step in a:
        assert b[step]["train/loss"] == pytest.approx(a[step]["train/loss"], rel=1e-4), step
    # the KL to the reference after training: sampled from the sharded policy on every process
    summary_a = json.loads((one / "tether_run.json").read_text())
    summary_b = json.loads((two / "tether_run.json").read_text())
    assert summary_b["eval/kl_ref"] == pytest.approx(summary_a["eval/kl_ref"], rel=1e-3, abs=1e-4)


def test_a_sharded_reward_model_matches_one_process(tiny_models, tmp_path):
    from tether.models.load import load_tokenizer
    from tether.models.reward import load_reward_model, score_texts

    rows = story_rows(24)
    pairs = write_jsonl(tmp_path / "p.jsonl", [{"prompt": r["prompt"], "chosen": r["completion"],
                                                "rejected": rows[(i + 1) % len(rows)]["completion"]}
                                               for i, r in enumerate(rows)])
    model = _without_dropout(tiny_models["llama"], tmp_path / "model")
    one, two = tmp_path / "one", tmp_path / "two"
    args = ("--data", str(pairs), "--lr", "1e-3", "--max-steps", "3", "--no-progress",
            "--no-tensorboard", "--eval-fraction", "0.2")
    assert main(["rm", "--model", str(model), "--output-dir", str(one), "--batch-size", "4", *args]) == 0
    _launch("rm", "--model", str(model), "--output-dir", str(two), "--batch-size", "2", "--fsdp", *args)
    a, b = _rows(one), _rows(two)
    for step in a:
        assert b[step]["train/loss"] == pytest.approx(a[step]["train/loss"], rel=1e-4), step
    assert b[3]["eval/accuracy"] == a[3]["eval/accuracy"]
    # calibrated the same way (every process scored the calibration set), saved as one RM
    prompts, responses = [r["prompt"] for r in rows[:6]], [r["completion"] for r in rows[:6]]
    sa, sb = (score_texts(load_reward_model(str(d)).eval(), load_tokenizer(str(d)), prompts, responses)
              for d in (one, two))
    assert sb == pytest.approx(sa, abs=1e-4)


@pytest.fixture
def ppo_inputs(tiny_models, tmp_path):
    from tether.world import World

    model = _without_dropout(tiny_models["llama"], tmp_path / "model")
    rows = story_rows(16)
    pairs = write_jsonl(tmp_path / "p.jsonl", [{"prompt": r["prompt"], "chosen": r["completion"],
                                                "rejected": rows[(i + 1) % len(rows)]["completion"]}
                                               for i, r in enumerate(rows)])
    rm = tmp_path / "rm"
    assert main(["rm", "--model", str(model), "--data", str(pairs), "--output-dir", str(rm), "--max-steps", "2",
                 "--batch-size", "4", "--eval-fraction", "0", "--no-progress", "--no-tensorboard"]) == 0
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in World(0).prompts(32, "train")])
    return model, rm, prompts


def _ppo_args(model, rm, prompts, out, *extra):
    return ["ppo", "--policy", str(model), "--reward-model", str(rm), "--prompts", str(prompts),
            "--output-dir", str(out), "--response-length", "6", "--ppo-epochs", "2",
            "--no-progress", "--no-tensorboard", *extra]


# Both critics, and both ways of gathering the policy for sampling: the rollouts of iterations 2
# and 3 come from the updated policy, so a sampler reading stale gathered weights would differ.
@pytest.mark.parametrize("critic,sampling", [("head", "per-layer"), ("separate", "gathered")])
def test_sharded_ppo_matches_one_process_resumes_and_saves_a_plain_policy(ppo_inputs, tmp_path, critic,
                                                                          sampling):
    from transformers import AutoModelForCausalLM

    model, rm, prompts = ppo_inputs
    one, two, resumed = tmp_path / "one", tmp_path / "two", tmp_path / "resumed"
    assert main(_ppo_args(model, rm, prompts, one, "--max-steps", "3", "--batch-size", "8",
                          "--critic", critic)) == 0
    sharded = ("--max-steps", "3", "--batch-size", "4", "--fsdp", "--save-every", "2", "--keep-checkpoints", "3",
               "--critic", critic, "--fsdp-sampling", sampling)
    _launch(*_ppo_args(model, rm, prompts, two, *sharded))
    a, b = _rows(one), _rows(two)
    assert sorted(a) == sorted(b) == [1, 2, 3]
    for step in a:  # rollouts sampled from the sharded policy are the same; so is the update
        for key in ("objective/rm_score", "policy/grad_norm", "policy/loss", "val/loss"):
            assert b[step][key] == pytest.approx(a[step][key], rel=1e-4, abs=1e-6), (step, key)
        # the KL is a difference of two sums of logprobs (6 tokens, |log p| up to ~7): its float
        # error is that of the logprobs, about 1e-5 here, not a share of its own small size
        assert b[step]["objective/kl"] == pytest.approx(a[step]["objective/kl"], abs=1e-4), step
        # each process holds half of every model: weights, optimizer states, and the frozen
        # reference's and RM's weights too (none kept whole after a forward)
        assert b[step]["memory/state_mb"] == pytest.approx(a[step]["memory/state_mb"] / 2, rel=0.02), step
    ids = torch.tensor([[1, 5, 9, 14, 3, 7]])
    with torch.no_grad():
        la = AutoModelForCausalLM.from_pretrained(one).eval()(ids).logits
        lb = AutoModelForCausalLM.from_pretrained(two).eval()(ids).logits
    assert torch.allclose(la, lb, atol=1e-4, rtol=1e-4)
    if critic == "head":
        assert (two / "critic" / "value_head.safetensors").exists()
    else:  # the separate critic is saved whole too, and computes what the one-process one does
        from tether.models.reward import load_reward_model, per_token_scalars

        with torch.no_grad():
            va, vb = (per_token_scalars(load_reward_model(str(d / "critic")).eval(), ids, torch.ones_like(ids))
                      for d in (one, two))
        assert torch.allclose(va, vb, atol=1e-4, rtol=1e-4)
    # interrupted after iteration 2: resuming from its sharded checkpoint finishes the same run
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(two / "checkpoints" / "step-2", resumed / "checkpoints" / "step-2")
    _launch(*_ppo_args(model, rm, prompts, resumed, *sharded, "--resume"))
    c = _rows(resumed)
    assert sorted(c) == [3]
    for key in ("objective/rm_score", "objective/kl", "policy/grad_norm"):
        assert c[3][key] == pytest.approx(b[3][key], rel=1e-6, abs=1e-7), key


def test_sharded_grpo_runs_to_the_end(ppo_inputs, tmp_path):
    """Through transformers' generate() too (synced_gpus: every forward is a collective)."""
    model, _, prompts = ppo_inputs
    fn = tmp_path / "r.py"
    fn.write_text("def score(prompts, completions, **_):\n    return [float(len(c)) for c in completions]\n")
    out = tmp_path / "grpo"
    _launch("grpo", "--policy", str(model), "--reward-fn", f"{fn}:score", "--prompts", str(prompts),
            "--output-dir", str(out), "--max-steps", "2", "--batch-size", "2", "--num-generations", "4",
            "--response-length", "6", "--fsdp", "--generation-backend", "hf", "--no-progress", "--no-tensorboard")
    assert sorted(_rows(out)) == [1, 2] and (out / "model.safetensors").exists()


ENV = '''
class Uneven:
    """Episodes of one to three turns, as the sampled text decides: the processes' episodes end
    at different turns, and each turn's sampling is a collective under --fsdp."""

    def reset(self, row):
        self.turn = 0
        return None

    def step(self, action):
        self.turn += 1
        done = self.turn == 3 or len(action) % 3 == 0
        return (None if done else " then"), float(len(action) % 5), done
'''


@pytest.mark.parametrize("backend, fsdp", [("torch", True), ("hf", True), ("torch", False)])
def test_grpo_with_an_environment_runs_episodes_of_uneven_length_on_two_processes(ppo_inputs, tmp_path,
                                                                                   backend, fsdp):
    """Every process samples as many turns as the one with the longest episodes, so a process
    whose episodes ended early still joins every sharded forward (no hang, no error); without
    --fsdp (DDP) each process keeps its own KV cache across turns."""
    model, _, prompts = ppo_inputs
    (tmp_path / "envs.py").write_text(ENV)
    # 5 held-out prompts: the last global batch of 4 rows leaves one process without any, and
    # it still joins the other's turns
    held_out = write_jsonl(tmp_path / "eval.jsonl", [{"prompt": r["prompt"]} for r in story_rows(5)])
    out = tmp_path / "grpo"
    _launch("grpo", "--policy", str(model), "--env", f"{tmp_path / 'envs.py'}:Uneven", "--prompts", str(prompts),
            "--eval-prompts", str(held_out),
            "--output-dir", str(out), "--max-steps", "2", "--batch-size", "2", "--num-generations", "4",
            "--response-length", "6", "--max-turns", "3", "--generation-backend", backend,
            "--no-progress", "--no-tensorboard", *(["--fsdp"] if fsdp else []))
    rows = _rows(out)
    assert sorted(rows) == [1, 2] and (out / "model.safetensors").exists()
    assert all(1 <= r["env/turns"] <= 3 for r in rows.values())
    assert rows[2]["eval/env_reward"] >= 0 and 0 <= rows[2]["eval/tool_call_rate"] <= 1


def test_sharded_online_dpo_matches_one_process(ppo_inputs, tmp_path):
    """Pairs sampled from the sharded policy, labelled by the sharded RM, the pair loss's mean over
    both processes' pairs: the run one process makes with the whole batch."""
    model, rm, prompts = ppo_inputs
    one, two = tmp_path / "one", tmp_path / "two"

    def args(out, *extra):
        return ["online-dpo", "--policy", str(model), "--reward-model", str(rm), "--prompts", str(prompts),
                "--output-dir", str(out), "--response-length", "6", "--max-steps", "3", "--lr", "1e-3",
                "--no-progress", "--no-tensorboard", *extra]

    assert main(args(one, "--batch-size", "4")) == 0
    _launch(*args(two, "--batch-size", "2", "--fsdp"))
    a, b = _rows(one), _rows(two)
    assert sorted(a) == sorted(b) == [1, 2, 3]
    for step in a:
        for key in ("objective/rm_score", "policy/loss", "policy/grad_norm", "rewards/margin", "dpo/labelled_frac"):
            assert b[step][key] == pytest.approx(a[step][key], rel=1e-4, abs=1e-6), (step, key)
        assert b[step]["objective/kl"] == pytest.approx(a[step]["objective/kl"], abs=1e-4), step


def test_sharded_bon_and_eval_sample_what_one_process_samples(ppo_inputs, tmp_path):
    """bon and eval spread their prompts over the processes (7 prompts x 3 samples in batches of
    4: the last batch has one row, which the second process repeats), with --fsdp sharding the
    policy, the RM and the reference; the results are those of one process."""
    model, rm, prompts = ppo_inputs
    bon = ("bon", "--policy", str(model), "--reward-model", str(rm), "--prompts", str(prompts), "--n", "3",
           "--max-prompts", "7", "--batch-size", "4", "--response-length", "6", "--no-progress")
    assert main([*bon, "--output-dir", str(tmp_path / "bon1")]) == 0
    _launch(*bon, "--output-dir", str(tmp_path / "bon2"), "--fsdp")
    _launch(*bon, "--output-dir", str(tmp_path / "bon2r"))  # spread, not sharded
    one = [json.loads(line) for line in (tmp_path / "bon1" / "bon.jsonl").read_text().splitlines()]
    for other in ("bon2", "bon2r"):
        two = [json.loads(line) for line in (tmp_path / other / "bon.jsonl").read_text().splitlines()]
        assert [r["responses"] for r in two] == [r["responses"] for r in one]
        for a, b in zip(one, two):
            assert b["scores"] == pytest.approx(a["scores"], abs=1e-4)
    ev = ("eval", "--policy-a", str(model), "--policy-b", str(tmp_path / "bon1" / "bon.jsonl"),
          "--prompts", str(prompts), "--max-prompts", "7", "--judge", str(rm), "--reference", str(rm.parent / "model"),
          "--batch-size", "3", "--response-length", "6", "--no-progress")
    assert main([*ev, "--output", str(tmp_path / "e1.json")]) == 0
    _launch(*ev, "--output", str(tmp_path / "e2.json"), "--fsdp")
    e1, e2 = (json.loads((tmp_path / f).read_text()) for f in ("e1.json", "e2.json"))
    assert [s["a"] for s in e2["samples"]] == [s["a"] for s in e1["samples"]]
    for key in ("win_rate", "score_a_mean", "score_b_mean", "kl_a_to_reference"):
        assert e2[key] == pytest.approx(e1[key], abs=1e-4), key
    assert e1["prompts"] == e2["prompts"] == 7
