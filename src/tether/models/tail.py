"""The last decoder layer, computed only at the positions whose output is read.

PPO reads the policy, the reference and the critic at the T response-predicting positions only
(`logits_to_keep` already keeps the LM head off the others), and a reward model reads one
position per row. Every layer but the last must still run everywhere, since its output at a
prompt position feeds later positions through the next layer's keys and values. The last
layer's output at a position that is not read feeds nothing: there only its keys and values are
needed. Inside `reading_last(model, n)`, the last layer computes keys and values at every
position, and its queries, attention output, MLP and residual stream at the last n positions
only. The positions before them come out as zeros, which nothing reads. On the PPO benchmark's
model (4 layers, 16-token prompts, 32-token responses) that skips 15 of 47 positions in the
policy's last layer and 46 of 47 in the reward model's: 6% of the head critic's model FLOPs.

It applies to transformers' own Llama, Mistral, Qwen2 and Qwen3 decoder layers under SDPA,
where it computes the layer's own function (the same modules, rotary formula and attention
call, only on fewer query rows; a unit test holds outputs and gradients to the model's own
forward). Anything else runs the model's own layer unchanged: other architectures, another
attention implementation, gradient checkpointing, a KV cache, sharded or offloaded parameters.

It is guarded (`tether.models.guard`): on a transformers release it was not verified on, on a
layer whose forward takes keywords it does not know, or when its probe on a model disagrees
with the model's own forward (outputs or gradients), that model runs its own layer.
"""

from __future__ import annotations

import contextlib
import types
from typing import Any, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from tether.models.guard import FastPath, mismatch
from tether.models.load import weights_not_in_place

SUPPORTED = ("LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer", "Qwen3DecoderLayer")
GUARD = FastPath("tether.models.tail (the last layer at the read positions only)")
# The decoder layer's forward keywords that `_tail_forward` understands. A layer whose forward
# takes any other is not run by it. The cache has had three names across releases.
CACHE_KEYWORDS = ("past_key_values", "past_key_value", "cache")
KNOWN_KEYWORDS = {"self", "hidden_states", "attention_mask", "position_ids", "use_cache",
                  "cache_position", "position_embeddings", "kwargs", *CACHE_KEYWORDS}


def _trunk(model: Any) -> Any:
    """The decoder stack (`LlamaModel` etc.) of a causal LM, sequence classifier or trunk,
    through peft wrappers."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(inner, "base_model", inner)


def last_layer(model: Any) -> Optional[torch.nn.Module]:
    """The last decoder layer of a transformers causal LM, sequence classifier or trunk (peft
    wrappers included) when `reading_last` supports it, else None."""
    layers = getattr(_trunk(model), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or len(layers) == 0:
        return None
    layer = layers[-1]
    cls = type(layer)
    if cls.__name__ not in SUPPORTED or not cls.__module__.startswith("transformers.models."):
        return None  # transformers' own classes only: remote code may reuse a name
    config = getattr(layer.self_attn, "config", None)
    if getattr(config, "_attn_implementation", None) != "sdpa":
        return None
    if weights_not_in_place(layer) is not None:
        return None
    if "forward" in vars(layer) and "_tether_read" not in vars(layer):
        return None  # something else has replaced this layer's forward
    return layer


def unknown_keywords(layer: torch.nn.Module) -> list[str]:
    """The keywords of the layer class's forward that `_tail_forward` does not know."""
    import inspect

    return sorted(set(inspect.signature(type(layer).forward).parameters) - KNOWN_KEYWORDS)


def checked_last_layer(model: Any) -> Optional[torch.nn.Module]:
    """`last_layer(model)` once the guard trusts the tail on this model, else None."""
    layer = last_layer(model)
    if layer is None or "_tether_read" in vars(layer):
        return layer  # inside a block: checked when the block was entered
    return layer if GUARD.trusted(layer, lambda: _probe(model, layer)) else None


def _probe(model: Any, layer: torch.nn.Module) -> Optional[str]:
    """The model's trunk on a small left-padded batch, with its own last layer and with the
    tail's: the same hidden states at the read positions, the same gradients of the last layer's
    parameters, and the model's own layer wherever a KV cache is used."""
    unknown = unknown_keywords(layer)
    if unknown:
        return f"{type(layer).__name__}.forward takes {', '.join(unknown)}, which it does not know"
    trunk = _trunk(model)
    param = next(layer.parameters())
    vocab = trunk.get_input_embeddings().num_embeddings
    ids = torch.randint(0, vocab, (2, 8), generator=torch.Generator().manual_seed(0)).to(param.device)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    n, params = 3, [p for p in layer.parameters()]
    trainable, was_training = [p.requires_grad for p in params], trunk.training
    trunk.eval()
    try:
        for p in params:
            p.requires_grad_(True)
        with torch.enable_grad():
            full = trunk(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
            with _swapped(layer, n):
                ours = trunk(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state[:, -n:]
                with torch.no_grad():  # a KV cache: the tail must leave the layer to itself
                    cached = trunk(input_ids=ids, attention_mask=mask, use_cache=True).last_hidden_state
            theirs = full[:, -n:]
            weights = torch.randn(theirs.shape, generator=torch.Generator().manual_seed(1)).to(theirs)
            g_theirs = torch.autograd.grad((theirs * weights).sum(), params, allow_unused=True)
            g_ours = torch.autograd.grad((ours * weights).sum(), params, allow_unused=True)
    finally:
        for p, flag in zip(params, trainable):
            p.requires_grad_(flag)
        trunk.train(was_training)
    problems = [mismatch("hidden states", ours, theirs),
                mismatch("hidden states in a KV-cache forward", cached, full.detach())]
    for (name, _), a, b in zip(layer.named_parameters(), g_ours, g_theirs):
        if (a is None) != (b is None):
            problems.append(f"gradient of {name}: computed on one side only")
        elif a is not None:
            problems.append(mismatch(f"gradient of {name}", a, b))
    problems = [p for p in problems if p is not None]
    return f"its probe disagrees with the model: {problems[0]}" if problems else None


@contextlib.contextmanager
def reading_last(model: Any, n: int) -> Iterator[None]:
    """Within this block, `model`'s forward computes its last layer at the last n positions
    only (see the module docstring); a model it does not support runs unchanged."""
    layer = checked_last_layer(model) if n > 0 else None
    if layer is None or (layer.training and getattr(layer, "gradient_checkpointing", False)):
        yield  # checkpointing would recompute the layer after this block, at full length
        return
    with _swapped(layer, n):
        yield


@contextlib.contextmanager
def _swapped(layer: torch.nn.Module, n: int) -> Iterator[None]:
    # The layer's forward is replaced for the block only, so that nothing of it outlives the
    # block (a saved or pickled model holds plain transformers layers).
    nested = "_tether_read" in vars(layer)
    previous = layer._tether_read if nested else None
    if not nested:
        layer.forward = types.MethodType(_tail_forward, layer)
    layer._tether_read = n
    try:
        yield
    finally:
        if nested:
            layer._tether_read = previous
        else:
            del layer.forward, layer._tether_read


def _tail_forward(self: Any, hidden_states: Tensor, attention_mask: Optional[Tensor] = None,
                  position_embeddings: Optional[tuple[Tensor, Tensor]] = None, **kwargs: Any) -> Tensor:
    """The decoder layer's forward, its output computed at the last `self._tether_read`
    positions only. Falls back to the layer's own forward with a cache (under any of its
    names), with a mask it does not know, or with a keyword it does not know."""
    B, L, _ = hidden_states.shape
    n = self._tether_read
    known_mask = attention_mask is None or (attention_mask.dim() == 4 and attention_mask.dtype == torch.bool)
    cached = any(kwargs.get(k) is not None for k in CACHE_KEYWORDS)
    unknown = any(v is not None and k not in KNOWN_KEYWORDS for k, v in kwargs.items())
    if n >= L or cached or unknown or position_embeddings is None or not known_mask:
        return type(self).forward(self, hidden_states, attention_mask=attention_mask,
                                  position_embeddings=position_embeddings, **kwargs)
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.models.llama.modeling_llama import rotate_half  # Qwen's and Mistral's too

    start, attn = L - n, self.self_attn
    x = self.input_layernorm(hidden_states)
    q = attn.q_proj(x[:, start:]).view(B, n, -1, attn.head_dim)
    k = attn.k_proj(x).view(B, L, -1, attn.head_dim)
    if hasattr(attn, "q_norm"):  # Qwen3: an RMSNorm over each head's q and k
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    v = attn.v_proj(x).view(B, L, -1, attn.head_dim).transpose(1, 2)
    cos, sin = (t.unsqueeze(1) for t in position_embeddings)  # (B or 1, 1, L, head_dim)
    q = q * cos[:, :, start:] + rotate_half(q) * sin[:, :, start:]
    k = k * cos + rotate_half(k) * sin
    if attention_mask is None:  # plain causal: query row i (position start + i) sees keys <= it
        rows = torch.ones(L, L, dtype=torch.bool, device=x.device).tril()[start:]
        mask = rows[None, None]
    else:
        mask = attention_mask[:, :, start:]
    out, _ = sdpa_attention_forward(attn, q, k, v, mask, scaling=attn.scaling,
                                    dropout=0.0 if not attn.training else attn.attention_dropout)
    h = hidden_states[:, start:] + attn.o_proj(out.reshape(B, n, -1).contiguous())
    h = h + self.mlp(self.post_attention_layernorm(h))
    return F.pad(h, (0, 0, start, 0))  # positions before `start`: zeros, never read
