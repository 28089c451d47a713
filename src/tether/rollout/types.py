"""The typed objects that one PPO iteration passes along: a Rollout, and the Experience built on it.

Layout: prompts are LEFT-padded to a common length P, so every response starts at column P and
the logits that predict response token t sit at column P - 1 + t for every row. Responses are
padded on the right after their first EOS. B is the number of rollouts, T the response length.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Optional

import torch
from torch import Tensor


@dataclass
class Rollout:
    """What a generator returns: the prompts it was given and the responses it sampled."""

    prompt_ids: Tensor  # (B, P) long, left-padded with the pad id
    prompt_mask: Tensor  # (B, P) long, 1 on real prompt tokens
    response_ids: Tensor  # (B, T) long, the pad id after the first EOS
    response_mask: Tensor  # (B, T) long, 1 up to and including the first EOS
    ended: Tensor  # (B,) bool, the response contains an EOS (else it was cut at T tokens)
    # (B, T) float32: the log-probability the sampler gave each token it drew, from an engine
    # with its own copy of the weights (vLLM); None when the policy itself sampled
    sampler_logprobs: Optional[Tensor] = None
    # (B, T) long: 1 on every real token after the prompt, the policy's and the environment's
    # observations alike (multi-turn episodes, tether.envs); there response_mask is 1 on the
    # policy's tokens only, the ones that are trained. None: the same as response_mask.
    response_attention: Optional[Tensor] = None

    @property
    def attention(self) -> Tensor:
        """(B, T): 1 on every real token after the prompt (what a forward attends to)."""
        return self.response_attention if self.response_attention is not None else self.response_mask

    @property
    def n_prompt(self) -> int:
        return self.prompt_ids.shape[1]

    @property
    def n_response(self) -> int:
        return self.response_ids.shape[1]

    def rows(self, index: Tensor) -> "Rollout":
        pick = lambda t: t[index] if t is not None else None  # noqa: E731
        return Rollout(self.prompt_ids[index], self.prompt_mask[index], self.response_ids[index],
                       self.response_mask[index], self.ended[index], pick(self.sampler_logprobs),
                       pick(self.response_attention))

    @staticmethod
    def concat(parts: list["Rollout"], pad_token_id: int) -> "Rollout":
        """Rollouts one after the other: prompts left-padded to the widest, responses (whole
        episodes, with --env, whose lengths differ between draws) right-padded to the longest."""
        P, T = max(r.n_prompt for r in parts), max(r.n_response for r in parts)
        left = lambda t, r, fill: torch.nn.functional.pad(t, (P - r.n_prompt, 0), value=fill)  # noqa: E731
        right = lambda t, r, fill: torch.nn.functional.pad(t, (0, T - r.n_response), value=fill)  # noqa: E731
        sampler = None
        if all(r.sampler_logprobs is not None for r in parts):
            sampler = torch.cat([right(r.sampler_logprobs, r, 0.0) for r in parts])
        attention = None
        if any(r.response_attention is not None for r in parts):
            attention = torch.cat([right(r.attention, r, 0) for r in parts])
        return Rollout(torch.cat([left(r.prompt_ids, r, pad_token_id) for r in parts]),
                       torch.cat([left(r.prompt_mask, r, 0) for r in parts]),
                       torch.cat([right(r.response_ids, r, pad_token_id) for r in parts]),
                       torch.cat([right(r.response_mask, r, 0) for r in parts]), torch.cat([r.ended for r in parts]),
                       sampler, attention)

    def sequences(self) -> "Sequences":
        """Prompt and response as one left-padded batch, ready for a forward pass."""
        input_ids = torch.cat([self.prompt_ids, self.response_ids], dim=1)
        attention_mask = torch.cat([self.prompt_mask, self.attention], dim=1)
        return Sequences(input_ids, attention_mask, position_ids_from_mask(attention_mask),
                         self.n_prompt, self.response_ids, self.response_mask)


@dataclass
class Sequences:
    """The inputs of every policy, reference and critic forward over a batch of rollouts."""

    input_ids: Tensor  # (B, P+T) long, prompt then response
    attention_mask: Tensor  # (B, P+T) long, 0 on left padding and after the first EOS (after
    #                         the episode's last token in a multi-turn rollout)
    position_ids: Tensor  # (B, P+T) long, 0 at the first real token (left padding shifts nothing)
    n_prompt: int  # P: the response starts at this column
    response_ids: Tensor  # (B, T) long, the tokens whose logprobs are wanted
    response_mask: Tensor  # (B, T) long, 1 on response tokens: the tokens the policy wrote,
    #                        which every loss, KL and entropy reads (never an observation's)

    def rows(self, index: Tensor) -> "Sequences":
        return replace(self, input_ids=self.input_ids[index], attention_mask=self.attention_mask[index],
                       position_ids=self.position_ids[index], response_ids=self.response_ids[index],
                       response_mask=self.response_mask[index])


@dataclass
class Experience:
    """One iteration's training batch: the sequences plus everything scored on them. The fields
    after `kl` are what the method trains on, and a method leaves out what it has no use for
    (built with keywords, so a missing one is None rather than a stand-in)."""

    seqs: Sequences  # the forward-pass inputs, (B, P+T)
    logprobs: Tensor  # (B, T) float32, log pi_old(y_t) at the sampling temperature
    ref_logprobs: Tensor  # (B, T) float32, log pi_ref(y_t) at the same temperature
    rm_scores: Tensor  # (B,) float32, the reward model's (and functions') score, as judged
    scores: Tensor  # (B,) float32, the score paid: rm_scores after the method's shaping
    ended: Tensor  # (B,) bool, the response contains an EOS
    kl: Tensor  # (B, T) float32, k1 = logprobs - ref_logprobs, 0 off the response
    rewards: Optional[Tensor] = None  # (B, T) float32, -beta * kl, plus the score at the end
    advantages: Optional[Tensor] = None  # (B, T) float32, per-token advantages
    values: Optional[Tensor] = None  # (B, T) float32, V_old(x, y_<t): with a critic only
    returns: Optional[Tensor] = None  # (B, T) float32, the critic's targets: with a critic only
    preference: Optional[Tensor] = None  # (B,) float32, +1 chosen, -1 rejected, 0 unlabelled
    #                                      (a preference pair's two rows are next to each other)

    @property
    def mask(self) -> Tensor:
        return self.seqs.response_mask

    @property
    def size(self) -> int:
        """Rollouts in the batch."""
        return self.kl.shape[0]

    def rows(self, index: Tensor) -> "Experience":
        """The minibatch of the given rows (every tensor field is indexed along dim 0)."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "seqs"}
        return Experience(seqs=self.seqs.rows(index),
                          **{k: v[index] if v is not None else None for k, v in out.items()})


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """0, 1, 2, ... counted over attended tokens only: (B, L) -> (B, L) long.

    With left padding, HF models would otherwise number the first real token P - len(prompt);
    models with absolute position embeddings (GPT-2) would then see shifted positions.
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
