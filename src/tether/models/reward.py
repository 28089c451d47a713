"""Scalar-head models: reward models (and critics initialised from them).

A tether reward model IS a Hugging Face `AutoModelForSequenceClassification` with
`num_labels=1`, the convention of reward models on the hub, so any such model works wherever
tether wants a reward model, and tether's RMs load in plain transformers. The score of a
sequence is the head applied to the hidden state of its last non-padding token. tether's
calibration bias is stored in `config.json` as `tether_reward_bias` and added by `score()`;
plain transformers gives the raw score (without the bias).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from tether.errors import TetherError

BIAS_KEY = "tether_reward_bias"
STD_KEY = "tether_reward_std"


def scalar_head(model: Any) -> torch.nn.Module:
    """The linear head of a sequence-classification model (`score` on most architectures)."""
    for name in ("score", "classifier", "v_head"):
        head = getattr(model, name, None)
        if isinstance(head, torch.nn.Module):
            return head
    raise TetherError(f"{type(model).__name__} has no scalar head named score/classifier")


def backbone(model: Any) -> torch.nn.Module:
    """The transformer trunk (without the head) of a sequence-classification model."""
    return model.base_model


def load_reward_model(name: str, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False,
                      pad_token_id: int | None = None) -> Any:
    """Load a hub-convention reward model (num_labels=1)."""
    from transformers import AutoModelForSequenceClassification

    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            name, num_labels=1, dtype=dtype, trust_remote_code=trust_remote_code)
    except Exception as err:
        raise TetherError(f"could not load a reward model (AutoModelForSequenceClassification, "
                          f"num_labels=1) from {name!r}: {type(err).__name__}: {err}") from None
    if pad_token_id is not None and model.config.pad_token_id is None:
        model.config.pad_token_id = pad_token_id
    return model


def init_reward_model(lm_name: str, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False,
                      pad_token_id: int | None = None, seed: int = 0) -> Any:
    """A reward model from a causal-LM checkpoint: its trunk plus a fresh head ~ N(0, 1/(d+1))."""
    model = load_reward_model(lm_name, dtype, trust_remote_code, pad_token_id)
    head = scalar_head(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        d = head.weight.shape[-1]
        head.weight.copy_(torch.randn(head.weight.shape, generator=gen) / math.sqrt(d + 1))
        if getattr(head, "bias", None) is not None:
            head.bias.zero_()
    return model


def per_token_scalars(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """The head applied at every position: shape (B, T) float32 (a critic's values)."""
    kwargs = {"position_ids": position_ids} if position_ids is not None else {}
    hidden = backbone(model)(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state
    head = scalar_head(model)
    return head(hidden.to(head.weight.dtype)).squeeze(-1).float()


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last attended position per row: (B, T) -> (B,) long."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (positions * attention_mask.bool()).argmax(dim=1)


def sequence_scores(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Raw score of each sequence at its last attended token: shape (B,) float32.

    Equals `AutoModelForSequenceClassification(...)(input_ids).logits[:, 0]` whenever the pad id
    occurs only in padding (HF reads the last token that is not the pad id).
    """
    hidden = backbone(model)(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    last = last_token_index(attention_mask)
    picked = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    head = scalar_head(model)
    return head(picked.to(head.weight.dtype)).squeeze(-1).float()


def reward_bias(model: Any) -> float:
    return float(getattr(model.config, BIAS_KEY, 0.0) or 0.0)


def calibrated_scores(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Scores with tether's calibration bias added (what PPO and best-of-N consume)."""
    return sequence_scores(model, input_ids, attention_mask) + reward_bias(model)
