"""Scalar-head models: reward models (and critics initialised from them).

A tether reward model IS a Hugging Face `AutoModelForSequenceClassification` with
`num_labels=1`, the convention of reward models on the hub, so any such model works wherever
tether wants a reward model, and tether's RMs load in plain transformers. The score of a
sequence is the head applied to the hidden state of its last non-padding token. tether's
calibration bias is stored in `config.json` as `tether_reward_bias` and added by `score()`;
plain transformers gives the raw score (without the bias).

A few causal-LM architectures have no sequence-classification class in transformers (CodeGen,
Granite and Cohere among them). For those, tether builds the same model from transformers'
generic parts (`GenericForSequenceClassification` on the architecture's own trunk): same
weights layout, same head, same last-token rule. It trains, saves and scores like any other,
but plain transformers cannot load it, since it has no class to load it into.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import torch

from tether.errors import TetherError
from tether.models.load import pad_id, within_positions
from tether.models.tail import reading_last

BIAS_KEY = "tether_reward_bias"
STD_KEY = "tether_reward_std"


HEAD_NAMES = ("score", "classifier", "v_head")


def _unwrap_peft(model: Any) -> Any:
    """The transformers model inside a peft wrapper (its LoRA layers stay active), else model."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def scalar_head_name(model: Any) -> str:
    """Attribute name of the scalar head (`score` on most architectures)."""
    inner = _unwrap_peft(model)
    for name in HEAD_NAMES:
        if isinstance(getattr(inner, name, None), torch.nn.Module):
            return name
    raise TetherError(f"{type(inner).__name__} has no scalar head named {'/'.join(HEAD_NAMES)}")


def scalar_head(model: Any) -> torch.nn.Module:
    """The linear head of a sequence-classification model (`score` on most architectures)."""
    return getattr(_unwrap_peft(model), scalar_head_name(model))


def backbone(model: Any) -> torch.nn.Module:
    """The transformer trunk (without the head) of a sequence-classification model."""
    return _unwrap_peft(model).base_model


def generic_reward_class(config: Any) -> Optional[type]:
    """A sequence-classification class for an architecture that transformers has none for:
    `GenericForSequenceClassification` mixed into the architecture's own PreTrainedModel, with
    its trunk under the usual attribute. None when the architecture has no registered trunk."""
    from transformers import AutoModel, PreTrainedModel
    from transformers.modeling_layers import GenericForSequenceClassification

    try:
        trunk = AutoModel._model_mapping[type(config)]
    except (KeyError, ValueError):
        return None
    base = next((c for c in trunk.__mro__ if PreTrainedModel in c.__bases__), None)
    if base is None:
        return None
    name = base.__name__.removesuffix("PreTrainedModel") + "ForSequenceClassification"
    return type(name, (GenericForSequenceClassification, base),
                {"base_model_prefix": base.base_model_prefix, "__module__": __name__})


def load_reward_model(name: str, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False,
                      pad_token_id: int | None = None, trained: bool = True) -> Any:
    """Load a hub-convention reward model (num_labels=1), or (trained=False) start one from a
    causal LM. With trained=True a checkpoint without a scalar head is refused: transformers
    would give it a random head, and every score would be noise."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(
            name, num_labels=1, dtype=dtype, trust_remote_code=trust_remote_code,
            output_loading_info=True)
    except Exception as err:
        if not (isinstance(err, ValueError) and "Unrecognized configuration class" in str(err)):
            raise TetherError(f"could not load a reward model (AutoModelForSequenceClassification, "
                              f"num_labels=1) from {name!r}: {type(err).__name__}: {err}") from None
        config = AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
        cls = generic_reward_class(config)
        if cls is None:
            raise TetherError(f"{name!r} ({config.model_type}) has no sequence-classification "
                              "class in transformers and no trunk tether can put a scalar head "
                              "on; use a reward-model backbone of another architecture") from None
        model, info = cls.from_pretrained(name, num_labels=1, dtype=dtype, output_loading_info=True)
    if trained:
        head = scalar_head_name(model)
        missing = sorted(k for k in info.get("missing_keys", ()) if k.split(".")[0] == head)
        if missing:
            raise TetherError(
                f"{name!r} is not a trained reward model: its checkpoint has no scalar head "
                f"({', '.join(missing)} missing), so transformers would start a random one. Is it "
                f"a causal LM? Train a reward model from it first: tether rm --model {name} ...")
    if pad_token_id is not None and getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = pad_token_id
    return model


def init_reward_model(lm_name: str, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False,
                      pad_token_id: int | None = None, seed: int = 0) -> Any:
    """A reward model from a causal-LM checkpoint: its trunk plus a fresh head ~ N(0, 1/(d+1))."""
    model = load_reward_model(lm_name, dtype, trust_remote_code, pad_token_id, trained=False)
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
    hidden = backbone(model)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                             **kwargs).last_hidden_state
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
    last = last_token_index(attention_mask)
    read = input_ids.shape[1] - int(last.min()) if last.numel() else 0  # from the earliest last token on
    with reading_last(model, read):
        hidden = backbone(model)(input_ids=input_ids, attention_mask=attention_mask,
                                 use_cache=False).last_hidden_state
    picked = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    head = scalar_head(model)
    return head(picked.to(head.weight.dtype)).squeeze(-1).float()


def reward_bias(model: Any) -> float:
    return float(getattr(model.config, BIAS_KEY, 0.0) or 0.0)


def calibrated_scores(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Scores with tether's calibration bias added (what PPO and best-of-N consume)."""
    return sequence_scores(model, input_ids, attention_mask) + reward_bias(model)


def score_texts(model: Any, tokenizer: Any, prompts: Sequence[Any], responses: Sequence[str],
                batch_size: int = 16, max_length: Optional[int] = None,
                calibrated: bool = True, chat: bool = False,
                rendered: Sequence[str] | None = None) -> list[float]:
    """Score each (prompt, response) pair: one float per pair, in input order.

    Tokenised the way the reward model was trained (`encode_prompt` + `encode_response`, no
    EOS; with `chat`, the string prompts are rendered chat templates and get no added special
    tokens). A prompt may be a conversation (a list of role/content messages): it is rendered,
    with the response as the assistant's turn, in the tokenizer's own chat template, as `tether
    rm` renders conversational data; `rendered` gives, per pair, the text to read instead when
    the tokenizer has no template (the prompt as the policy read it), and without it that is a
    DataError (`data.preference.render_for_scoring`). Sequences longer than `max_length` (at
    most the model's learned position table, when it has one: `models.load.within_positions`)
    are cut like training data (prompt from the left, response from the right). Calibrated
    scores (bias added) unless `calibrated=False`.
    """
    from tether.data.preference import encode_for_scoring, render_for_scoring

    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    max_length = within_positions(model, max_length)
    seqs = []
    for i, (prompt, response) in enumerate(zip(prompts, responses)):
        text, (response,), is_chat = render_for_scoring(
            tokenizer, prompt, [response], rendered[i] if rendered is not None else None, chat)
        seqs.append(encode_for_scoring(tokenizer, text, [response], max_length, is_chat)[0])
    pad = pad_id(tokenizer)
    return score_sequences(model, seqs, pad, batch_size, calibrated)


def score_sequences(model: Any, seqs: Sequence[list[int]], pad_id: int, batch_size: int = 16,
                    calibrated: bool = True) -> list[float]:
    """Score token-id sequences (prompt + response, no padding): one float each, in order.

    Batches are formed from length-sorted sequences so little compute goes to padding.
    """
    device = next(model.parameters()).device
    bias = reward_bias(model) if calibrated else 0.0
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    out = [0.0] * len(seqs)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for at in range(0, len(order), batch_size):
            chunk = order[at:at + batch_size]
            ids, mask = right_pad([seqs[i] for i in chunk], pad_id)
            scores = sequence_scores(model, ids.to(device), mask.to(device))
            for i, value in zip(chunk, scores.tolist()):
                out[i] = value + bias
    model.train(was_training)
    return out


def right_pad(seqs: Sequence[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and attention_mask, shape (B, longest), padded on the right."""
    width = max(1, max(len(s) for s in seqs))
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, s in enumerate(seqs):
        ids[row, :len(s)] = torch.tensor(s, dtype=torch.long)
        mask[row, :len(s)] = 1
    return ids, mask
