"""The PPO policy's forward pass, and its two kinds of critic.

- `Actor`: the policy, optionally with a value head on its trunk (`--critic head`, as in
  lm-human-preferences). One trunk pass gives both the logits and the values: the head reads
  the final hidden states on their way into the LM head, so nothing is computed twice.
- `Critic`: a separate value model (`--critic separate`, as in InstructGPT and the N+ details),
  a SequenceClassification model initialised from the reward model and read at every token.

Every forward here returns only the response part of a left-padded (prompt + response) batch:
column t of the output is what predicts response token t (sequence column P + t), which is
sequence column P - 1 + t. Logits of prompt positions are never computed, the last column
(which predicts nothing that is scored) is not fed, and where `tether.models.tail` supports the
model its last layer runs at the response-predicting positions only.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from torch import Tensor, nn

from tether.models.prefix import accepts_logits_to_keep, shareable_groups, shared_logits
from tether.models.reward import per_token_scalars, reward_bias
from tether.models.tail import reading_last

VALUE_HEAD_FILE = "value_head.safetensors"


def response_logits(lm: Any, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor,
                    n_response: int, keep_arg: Optional[bool] = None) -> Tensor:
    """Logits that predict the last n_response tokens: (B, L) inputs -> (B, n_response, V).

    The last column is not fed at all: what it would predict lies past the end. With
    `logits_to_keep` the LM head then runs on exactly the n_response positions wanted, so no
    prompt logits are computed and nothing is sliced afterwards (a slice's backward allocates
    and fills another logits-sized gradient).
    """
    groups = shareable_groups(lm, input_ids, attention_mask, input_ids.shape[1] - n_response)
    if groups is not None:  # G rows per prompt: the prompt is computed once (models/prefix.py)
        return shared_logits(lm, input_ids, attention_mask, position_ids, n_response, groups)
    keep = accepts_logits_to_keep(lm) if keep_arg is None else keep_arg
    kwargs = {"logits_to_keep": n_response} if keep else {}
    with reading_last(lm, n_response):  # the last layer runs at those positions only
        logits = lm(input_ids=input_ids[:, :-1], attention_mask=attention_mask[:, :-1],
                    position_ids=position_ids[:, :-1], use_cache=False, **kwargs).logits
    return logits if keep else logits[:, -n_response:]


class Actor(nn.Module):
    """The policy; with `value_head`, also the critic (values from the policy's own trunk)."""

    def __init__(self, lm: Any, value_head: Optional[nn.Linear] = None):
        super().__init__()
        self.lm = lm
        self.value_head = value_head
        self._keep = accepts_logits_to_keep(lm)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor,
                n_response: int) -> tuple[Tensor, Optional[Tensor]]:
        """(B, L) inputs -> (logits (B, T, V), values (B, T) float32 or None), T = n_response."""
        captured: list[Tensor] = []
        hook = None
        if self.value_head is not None:
            # The LM head's input is the trunk's final (normed) hidden state: borrow it there
            # rather than asking for all hidden states or running the trunk a second time.
            hook = self.lm.get_output_embeddings().register_forward_hook(
                lambda module, args, output: captured.append(args[0]))
        try:
            logits = response_logits(self.lm, input_ids, attention_mask, position_ids, n_response,
                                     self._keep)
        finally:
            if hook is not None:
                hook.remove()
        if self.value_head is None:
            return logits, None
        # (B, T, d) when logits_to_keep picked the positions or the prompt was shared (the
        # head's last call is the response pass), else (B, L - 1, d)
        hidden = captured[-1][:, -n_response:]
        head = self.value_head
        return logits, head(hidden.to(head.weight.dtype)).squeeze(-1).float()


def new_value_head(lm: Any) -> nn.Linear:
    """A d -> 1 linear head, zero-initialised: values start at 0, the calibrated RM's mean, so the
    first updates do not chase an arbitrary offset."""
    d = lm.get_output_embeddings().in_features
    head = nn.Linear(d, 1)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    return head.to(lm.get_output_embeddings().weight.device)


class Critic(nn.Module):
    """A separate value model: a SequenceClassification model read at every token."""

    def __init__(self, model: Any):
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor,
                n_response: int) -> Tensor:
        """(B, L) inputs -> values (B, n_response) float32: V(x, y_<t) read where the policy
        predicts y_t. The RM's calibration bias is added, so a critic initialised from the RM
        starts out predicting calibrated scores."""
        # As for the policy, the last column is never read: it is not fed.
        with reading_last(self.model, n_response):
            values = per_token_scalars(self.model, input_ids[:, :-1], attention_mask[:, :-1],
                                       position_ids[:, :-1])
        return values[:, -n_response:] + reward_bias(self.model)


def save_value_head(head: nn.Linear, output_dir: str | Path, state: Optional[dict] = None) -> Path:
    """Write a value head as output_dir/value_head.safetensors plus a small JSON description
    (`state`: its weights when they are not the module's own, e.g. gathered under --fsdp)."""
    from safetensors.torch import save_file

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in (state or head.state_dict()).items()}
    save_file(state, str(out / VALUE_HEAD_FILE))
    (out / "value_head.json").write_text(json.dumps(
        {"kind": "value_head", "in_features": head.in_features,
         "reads": "the policy's final hidden state (the LM head's input)"}, indent=2) + "\n")
    return out


def load_value_head(output_dir: str | Path) -> nn.Linear:
    from safetensors.torch import load_file

    state = load_file(str(Path(output_dir) / VALUE_HEAD_FILE))
    head = nn.Linear(state["weight"].shape[1], 1)
    head.load_state_dict(state)
    return head
