"""Build everything one online iteration needs (`OnlineParts`), for any method: the method's
`Algorithm` says which critic, KL controller and PPO-ptx data it wants. The loop and a
benchmark can both run iterations over the same components."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from tether.config import OnlineConfig
from tether.envs.api import load_environments
from tether.envs.episodes import EpisodeLimits, EpisodeRunner
from tether.errors import ConfigError
from tether.models.critic import Actor, Critic, new_value_head
from tether.models.load import (apply_lora, check_positions, count_parameters, disable_dropout, eos_token_ids,
                                fit_default_length, load_causal_lm, load_tokenizer)
from tether.models.reward import load_reward_model
from tether.ops.advantages import kl_penalised_rewards
from tether.recipes.online.algorithm import Algorithm, CriticKind, KLController, load_algorithm
from tether.recipes.online.data import PromptSet, PtxData, load_prompts
from tether.rollout.generate import Generator, SamplingParams, left_pad, make_generator
from tether.rollout.health import HealthMonitor, ReferenceProbe, check_reference_detached
from tether.rollout.reward_fns import RewardFunctions
from tether.rollout.score import Reference, RewardScorer, RewardSources, same_vocabulary
from tether.rollout.types import Rollout
from tether.training.batches import GlobalBatches
from tether.training.launch import make_accelerator, resolve_dtype
from tether.training.optim import adamw, make_scheduler

log = logging.getLogger("tether")

PROBE_ROWS, PROBE_TOKENS = 2, 8  # the reference probe: 2 prompts x 8 tokens, a tiny forward


@dataclass
class OnlineParts:
    """The components of an online run. `actor`, `critic` and the optimizers are the trainable,
    checkpointed ones; the reference and the reward model are frozen and rebuilt from their
    sources on resume."""

    cfg: OnlineConfig
    algorithm: Algorithm  # the method's own steps
    accelerator: Any
    tokenizer: Any
    actor: Actor  # the policy (and with --critic head its value head), as prepared by accelerate
    critic: Optional[Critic]  # the separate critic; None with --critic head and without a critic
    critic_kind: CriticKind
    optimizers: list  # [policy] or [policy, critic]
    schedulers: list  # one per optimizer, or empty for constant learning rates without warmup
    reference: Reference
    reward: RewardSources
    generator: Generator
    kl_ctl: KLController
    prompts: PromptSet
    order: GlobalBatches  # which prompts iteration i uses
    eos_token_ids: tuple[int, ...]
    probe: ReferenceProbe
    health: HealthMonitor = field(default_factory=HealthMonitor)
    eval_prompts: Optional[PromptSet] = None
    ptx: Optional[PtxData] = None
    # Builds the per-token rewards; a parameter so that tests can inject the faults the
    # health checks must catch (a flipped KL sign, a broadcast score).
    token_rewards: Callable = kl_penalised_rewards
    # --env: the multi-turn episode runner (tether.envs.episodes), and the single-token stop
    # strings of its environments, which end a turn as EOS does
    episodes: Optional[Any] = None
    stop_token_ids: tuple[int, ...] = ()

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    def trainables(self) -> list[tuple[str, Any, Any]]:
        """(metric prefix, model, optimizer) pairs: each is clipped and stepped on its own."""
        out = [("policy", self.actor, self.optimizers[0])]
        if self.critic is not None:
            out.append(("val", self.critic, self.optimizers[1]))
        return out

    def shards(self) -> Optional[tuple[list[Any], list[Any]]]:
        """(models, optimizers) whose states each process checkpoints itself under --fsdp."""
        if not self.cfg.fsdp:
            return None
        trainables = self.trainables()
        return [m for _, m, _ in trainables], [o for _, _, o in trainables]

    def state_bytes(self) -> int:
        """Bytes of the weights, gradients and optimizer states this process holds: the
        trainable models with their optimizers, and the frozen reference and RM (weights only;
        with LoRA the reference is the policy itself and counted once)."""
        from tether.training.fsdp import local, state_bytes

        total = sum(state_bytes(m, o) for _, m, o in self.trainables())
        seen = {id(p) for _, m, _ in self.trainables() for p in m.parameters()}
        for frozen in (self.reference.model, self.reward.model):
            for p in (frozen.parameters() if frozen is not None else ()):
                if id(p) not in seen:
                    seen.add(id(p))
                    total += local(p).nbytes
        return total

    def all_reduce_sum(self) -> Optional[Callable[[torch.Tensor], torch.Tensor]]:
        """A sum over all processes, for batch statistics; None with a single process."""
        if self.accelerator.num_processes == 1:
            return None
        return lambda t: self.accelerator.reduce(t, reduction="sum")

    def mean_over_processes(self, stats: dict[str, torch.Tensor]) -> dict[str, float]:
        """Each 0-dim statistic averaged over the processes (every process holds the same
        number of rollouts), as Python floats: the iteration's one host sync."""
        values = torch.stack([torch.as_tensor(v).to(self.device, torch.float32).reshape(())
                              for v in stats.values()])
        if self.accelerator.num_processes > 1:
            values = self.accelerator.reduce(values, reduction="mean")
        return dict(zip(stats, values.tolist()))

    def policy_lm(self) -> Any:
        """The policy as a plain (possibly peft-wrapped) causal LM."""
        return self.accelerator.unwrap_model(self.actor).lm


def stage_name(cfg: OnlineConfig) -> str:
    """ppo, grpo, rloo, online-dpo: the stage a config belongs to, for logs and completion
    markers."""
    return cfg.stage


def freeze(model: Any) -> Any:
    """Frozen for good: eval mode, dropout off, no parameter trainable."""
    disable_dropout(model)
    model.requires_grad_(False)
    return model.eval()


def unchanged(model: Any) -> Any:
    return model


def load_policy_and_reference(cfg: OnlineConfig, dtype: torch.dtype,
                              place: Callable[[Any], Any] = unchanged) -> tuple[Any, Reference]:
    """The trainable policy, and pi_ref: a frozen copy of --reference (default: of the policy as
    loaded), or with LoRA the policy's own base with adapters disabled (no second copy).
    place: applied to each model as soon as it is loaded (under --fsdp: sharded, so that a
    process never holds more than one whole model at a time)."""
    lm = load_causal_lm(cfg.policy, dtype, cfg.trust_remote_code, cfg.gradient_checkpointing)
    disable_dropout(lm)
    if cfg.lora_r > 0:
        lm = apply_lora(lm, cfg.lora_r, cfg.lora_alpha, 0.0, cfg.lora_target_modules)
        return lm, Reference(lm, adapters_off=True)
    lm = place(lm)
    ref = place(freeze(load_causal_lm(cfg.reference or cfg.policy, dtype, cfg.trust_remote_code)))
    if cfg.reference and ref.get_output_embeddings().weight.shape != lm.get_output_embeddings().weight.shape:
        raise ConfigError(f"--reference {cfg.reference} does not share the policy's vocabulary and "
                          f"width (LM head {tuple(ref.get_output_embeddings().weight.shape)} against "
                          f"{tuple(lm.get_output_embeddings().weight.shape)}); the KL compares their "
                          "token probabilities, so give a reference of the same model family")
    return lm, Reference(ref)


def load_reward_side(cfg: OnlineConfig, tokenizer: Any, dtype: torch.dtype, eos_ids: tuple[int, ...],
                     critic: CriticKind, place: Callable[[Any], Any] = unchanged
                     ) -> tuple[RewardSources, Optional[Critic]]:
    """The rewards (the frozen RM, its calibration bias included in its scores, and/or the
    --reward-fn functions) and, with --critic separate, a trainable critic initialised from
    the RM. place: as in `load_policy_and_reference`."""
    functions = RewardFunctions.from_config(cfg.reward_fn, cfg.reward_weights or []) \
        if cfg.reward_fn else None
    if not cfg.reward_model:
        return RewardSources(None, functions, tokenizer, eos_ids), None
    rm = place(freeze(load_reward_model(cfg.reward_model, dtype, cfg.trust_remote_code, tokenizer.pad_token_id)))
    rm_tokenizer = None
    try:
        own = load_tokenizer(cfg.reward_model, cfg.trust_remote_code)
        rm_tokenizer = None if same_vocabulary(own, tokenizer) else own
    except Exception:  # an RM directory without tokenizer files shares the policy's
        rm_tokenizer = None
    if rm_tokenizer is not None:
        log.info("reward model has its own tokenizer: responses are re-tokenised for it")
        if critic == "separate":
            raise ConfigError("--critic separate initialises the critic from the reward model, which "
                              "needs the policy's tokenizer; this RM has another. Use --critic head.")
    scorer = RewardSources(RewardScorer(rm, eos_ids, tokenizer.pad_token_id, tokenizer, rm_tokenizer,
                                        max_length=cfg.max_prompt_length + cfg.episode_length),
                           functions, tokenizer, eos_ids)
    if critic != "separate":  # a value head on the policy, or no critic at all
        return scorer, None
    critic_model = load_reward_model(cfg.reward_model, dtype, cfg.trust_remote_code, tokenizer.pad_token_id)
    disable_dropout(critic_model)
    critic_model.config.use_cache = False  # a training forward has no use for a KV cache
    if cfg.gradient_checkpointing:
        critic_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return scorer, Critic(place(critic_model))


def make_optimizers(cfg: OnlineConfig, actor: Actor, critic: Optional[Critic]) -> list:
    """AdamW with eps 1e-5 (N+ details). With a value head, one optimizer holds both the policy
    (at --lr) and the head (at --value-lr), since they share the trunk's backward pass."""
    trainable = lambda m: [p for p in m.parameters() if p.requires_grad]  # noqa: E731
    groups = [{"params": trainable(actor.lm), "lr": cfg.lr}]
    if actor.value_head is not None:
        groups.append({"params": list(actor.value_head.parameters()), "lr": cfg.value_lr})
    optimizers = [adamw(groups, eps=cfg.adam_eps, weight_decay=0.0)]
    if critic is not None:
        optimizers.append(adamw(trainable(critic), lr=cfg.value_lr, eps=cfg.adam_eps, weight_decay=0.0))
    return optimizers


def check_lengths(cfg: OnlineConfig, prompts: PromptSet, eval_prompts: Optional[PromptSet],
                  models: list[tuple[str, Any]]) -> None:
    """Refuse prompts plus --response-length tokens that a model with learned position
    embeddings cannot take (`models.load.check_positions`), before any rollout."""
    lengths = [len(ids) for ids in prompts.ids + (eval_prompts.ids if eval_prompts is not None else [])]
    longest = max(lengths, default=0) + cfg.episode_length
    limit = "--max-total-length" if cfg.env else "--response-length"
    fix = (f"lower {limit} (now {cfg.episode_length}) or --max-prompt-length (now "
           f"{cfg.max_prompt_length}; longer prompts are cut or dropped as --prompt-truncation says)")
    for name, model in models:
        if model is not None:
            check_positions(model, longest, f"the longest prompt plus {limit}", fix, name)


def probe_rollout(prompts: PromptSet, pad_token_id: int, device: Any) -> Rollout:
    """The fixed probe batch of the reference check: the first prompts of the data set, each
    followed by the first prompt's own tokens as a stand-in response."""
    rows = prompts.ids[:PROBE_ROWS]
    ids, mask = left_pad(rows, pad_token_id, device)
    filler = (prompts.ids[0] * PROBE_TOKENS)[:PROBE_TOKENS]
    response = torch.tensor([filler] * len(rows), dtype=torch.long, device=device)
    ones = torch.ones_like(response)
    return Rollout(ids, mask, response, ones, torch.zeros(len(rows), dtype=torch.bool, device=device))


def env_tools(envs: list) -> Callable[[dict, str], Optional[list[dict]]]:
    """tools_for(row, where) of `load_prompts`: the JSON schemas of the tools of the row's
    environment (its class attribute `tools`), for chat templates with a tools section."""
    from tether.envs.tools import tool_schema

    schemas = {spec.name: [tool_schema(fn) for fn in spec.attribute("tools", ()) or ()] for spec in envs}

    def tools_for(row: dict, where: str) -> Optional[list[dict]]:
        name = envs[0].name if len(envs) == 1 else row.get("env")
        return schemas.get(name) or None

    return tools_for


def single_token_stops(tokenizer: Any, envs: list) -> tuple[int, ...]:
    """The environments' stop strings that are one token of the vocabulary (e.g. Qwen's
    </tool_call>): sampling then stops a turn at them as at EOS, rather than running on."""
    vocab = tokenizer.get_vocab()
    ids = {vocab[s] for spec in envs for s in spec.attribute("stop", ()) or () if s in vocab}
    return tuple(sorted(ids))


def build(cfg: OnlineConfig, accelerator: Any = None) -> OnlineParts:
    """Load and prepare every component of an online run (nothing is trained or written here)."""
    cfg.validate()  # also when the config was built in Python rather than by the CLI
    algorithm = load_algorithm(cfg)
    critic_kind = algorithm.critic()
    accelerator = accelerator or make_accelerator(cfg.seed)
    device, dtype = accelerator.device, resolve_dtype(cfg.dtype)
    # 1. tokenizer and prompts
    tokenizer = load_tokenizer(cfg.policy, cfg.trust_remote_code, padding_side="left")
    cfg = fit_default_length(cfg, "max_prompt_length", cfg.policy, cfg.episode_length,
                             "--max-total-length" if cfg.env else "--response-length")
    envs = load_environments(cfg.env) if cfg.env else []
    tools_for = env_tools(envs) if envs else None
    prompts = load_prompts(cfg.prompts, tokenizer, cfg.max_prompt_length, cfg.prompt_truncation, tools_for)
    eval_prompts = (load_prompts(cfg.eval_prompts, tokenizer, cfg.max_prompt_length, cfg.prompt_truncation,
                                 tools_for) if cfg.eval_prompts else None)
    # 2. models: policy, reference, reward model, critic. Under --fsdp every model is sharded
    #    as soon as it is loaded, each its own root (the policy is also called alone, to sample),
    #    and none is wrapped by accelerate: frozen ones get no optimizer state.
    place = unchanged
    if cfg.fsdp:
        from tether.training.fsdp import place as place_on

        place = lambda model: place_on(model, accelerator, True)  # noqa: E731
    lm, reference = load_policy_and_reference(cfg, dtype, place)
    eos_ids = tuple(eos_token_ids(tokenizer, lm))
    reward, critic = load_reward_side(cfg, tokenizer, dtype, eos_ids, critic_kind, place)
    check_lengths(cfg, prompts, eval_prompts, [(f"the policy {cfg.policy}", lm),
                                               ("the reference", reference.model),
                                               ("the reward model", reward.model),
                                               ("the critic", critic.model if critic is not None else None)])
    # Train mode only switches on gradient checkpointing: every dropout is already 0.
    actor = Actor(lm, new_value_head(lm) if critic_kind == "head" else None).train()
    if critic is not None:
        critic.train()
    log.info("%s: policy %s (%.2fM parameters), critic %s, %d prompts", stage_name(cfg), cfg.policy,
             count_parameters(lm) / 1e6, critic_kind, len(prompts.ids))
    for frozen in {id(m): m for m in (reference.model, reward.model) if m is not None}.values():
        frozen.to(device)
    # 3. optimizers; accelerate prepares (and checkpoints) only the trainable side. Under --fsdp
    #    the value head is sharded on its own too.
    if cfg.fsdp and actor.value_head is not None:
        from tether.training.fsdp import shard_whole

        shard_whole(actor.value_head.to(device), accelerator)
    optimizers = make_optimizers(cfg, actor, critic)
    # A schedule only when asked for. As in SFT, its state goes into trainer_state.json (JSON,
    # never a pickle) and it is not wrapped by accelerate (which would step it once per process).
    schedulers = []
    if cfg.lr_scheduler != "constant" or cfg.warmup_ratio > 0:
        schedulers = [make_scheduler(o, cfg.lr_scheduler, cfg.warmup_ratio, cfg.optimizer_steps)
                      for o in optimizers]
    if not cfg.fsdp:  # (under --fsdp every model was sharded as it was loaded)
        if critic is None:
            actor, optimizers[0] = accelerator.prepare(actor, optimizers[0])
        else:
            actor, critic, optimizers[0], optimizers[1] = accelerator.prepare(actor, critic, *optimizers)
    # 4. generation, KL control, health probe, PPO-ptx
    params = SamplingParams(cfg.response_length, cfg.temperature, cfg.top_k, cfg.top_p,
                            () if cfg.ignore_eos else eos_ids, tokenizer.pad_token_id,
                            noise_shard=(accelerator.process_index, accelerator.num_processes))
    engine = None
    if cfg.generation_backend == "vllm":
        # the engine's context holds the longest prompt (after truncation) and a full response
        longest = max(len(ids) for ids in prompts.ids + (eval_prompts.ids if eval_prompts is not None else []))
        engine = dict(source=cfg.policy, dtype=dtype, max_model_len=longest + cfg.episode_length,
                      seed=cfg.seed, gpu_memory_utilization=cfg.vllm_gpu_memory_utilization,
                      sleep=cfg.vllm_sleep, trust_remote_code=cfg.trust_remote_code,
                      max_rows=cfg.rollouts)
    generator = make_generator(cfg.generation_backend, accelerator.unwrap_model(actor).lm, params,
                               gather=cfg.fsdp and cfg.fsdp_sampling == "gathered", engine=engine)
    kl_ctl = algorithm.kl_controller()
    probe = ReferenceProbe(probe_rollout(prompts, tokenizer.pad_token_id, device).sequences(),
                           cfg.temperature)
    probe.check(reference)  # records the baseline before any update
    trainable = [p for opt in optimizers if opt is not None for g in opt.param_groups for p in g["params"]]
    issue = check_reference_detached(reference, trainable)
    if issue is not None:
        raise ConfigError(issue.message)
    ptx_source = algorithm.ptx_source()
    ptx = (PtxData(ptx_source, tokenizer, cfg.max_prompt_length + cfg.response_length,
                   cfg.minibatch, cfg.seed, accelerator.num_processes, accelerator.process_index)
           if ptx_source else None)
    if ptx is not None:
        check_positions(lm, max((len(r) for r in ptx.rows), default=0), "the --ptx-data rows (cut to "
                        "--max-prompt-length plus --response-length)", "lower --max-prompt-length", cfg.policy)
    order = GlobalBatches(len(prompts.ids), cfg.batch_size, 1, accelerator.num_processes, cfg.seed)
    episodes, stop_ids = None, ()
    if envs:
        episodes = EpisodeRunner(envs, tokenizer, eos_ids, tokenizer.pad_token_id, EpisodeLimits(
            cfg.max_turns, cfg.episode_length, cfg.response_length, cfg.env_errors, cfg.env_timeout))
        stop_ids = single_token_stops(tokenizer, envs)
    parts = OnlineParts(cfg, algorithm, accelerator, tokenizer, actor, critic, critic_kind, optimizers,
                        schedulers, reference, reward, generator, kl_ctl, prompts, order, eos_ids, probe,
                        eval_prompts=eval_prompts, ptx=ptx, episodes=episodes, stop_token_ids=stop_ids)
    algorithm.setup(parts)
    return parts
