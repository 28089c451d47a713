"""A one-token decode step for Llama-family models that skips transformers' per-call overhead.

Generation calls the model once per token with a batch of B single tokens. At that size the
model's own forward is mostly overhead: mask building, cache objects, module dispatch, q/k/v
and gate/up as separate matmuls, and a concatenation of the whole KV cache at every step. Here
one step is a short loop over the layers that reads the model's own weights and norm, rotary
and activation modules:

- the KV cache lives in buffers allocated once for the whole response, written in place;
- q, k, v come from one matmul on the concatenated weights, and gate and up from another
  (the concatenations are rebuilt at every `start`, since the policy changes between rollouts);
- grouped-query attention reads the shared K/V heads directly: the G query heads of a group
  are treated as G query rows of one attention call;
- each matmul is computed as W @ x^T: for B of a few dozen rows and weights that no longer sit
  in cache, MKL runs that orientation about 1.4x faster than x @ W^T.

It runs on CPU only, where it was measured (0.15 s against 0.22 s for 32 tokens of 16 prompts
on the PPO benchmark's model); on a GPU the model keeps its own forward. The concatenated
weights and the KV buffers exist from `start` to `finish`, one rollout.

The prefill still runs the model's own forward (one call; its cache is copied in). The decode
step computes the same function as the model's forward, up to float rounding, and a unit test
holds it to that for each supported architecture. Anything this module does not know exactly
(another architecture, sliding-window layers, LoRA or quantized linears, sharded or offloaded
parameters) gets `None` from `decoder_for` and keeps the model's own forward. So does a model
on a transformers release the step was not verified on, or one on which its probe (a prefill
and three steps, held to the model's own full forward) disagrees: `tether.models.guard`. The
step runs under no_grad, so only outputs are probed.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor
from transformers.models.llama.modeling_llama import rotate_half  # Mistral's, Qwen2's and Qwen3's too

from tether.models.guard import FastPath, mismatch
from tether.models.load import weights_not_in_place
from tether.models.prefix import output_cache
from tether.rollout.types import position_ids_from_mask

# The CausalLM classes whose decoder layers are exactly: x + attn(input_layernorm(x)), then
# x + down(act(gate(.)) * up(.)) on post_attention_layernorm(x), with rotary q/k and a plain
# softmax attention (optional q/k/v/o/mlp biases; Qwen3 normalises each q and k head with its
# own RMSNorm, q_norm and k_norm, before the rotary).
SUPPORTED = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
HEAD_NORMS = {"Qwen3ForCausalLM"}  # the classes whose attention has q_norm and k_norm
GUARD = FastPath("tether.rollout.decode (the fused decode step)")


def unsupported_reason(model: Any) -> Optional[str]:
    """Why `model` cannot use the fused decode step, or None when it can."""
    import transformers

    name = type(model).__name__
    # transformers' own classes only: remote code may reuse a name for another layout
    if name not in SUPPORTED or type(model) is not getattr(transformers, name, None):
        return f"{type(model).__module__}.{name} is not one of transformers' {', '.join(SUPPORTED)}"
    cfg = model.config
    if any(kind != "full_attention" for kind in (getattr(cfg, "layer_types", None) or ())):
        return "the model has sliding-window layers"
    try:
        body = model.model
        parts = [model.lm_head]
        for layer in body.layers:
            a, m = layer.self_attn, layer.mlp
            parts += [a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj, m.up_proj, m.down_proj]
            _ = (layer.input_layernorm, layer.post_attention_layernorm, a.head_dim, a.scaling, m.act_fn)
            if name in HEAD_NORMS:
                _ = (a.q_norm, a.k_norm)
        _ = (body.embed_tokens, body.norm, body.rotary_emb)
    except AttributeError as err:
        return f"unexpected module layout ({err})"
    if any(type(p) is not torch.nn.Linear for p in parts):
        return "some projections are not plain nn.Linear (LoRA, quantized, ...)"
    reason = weights_not_in_place(model)
    if reason is not None:
        return reason
    params = list(model.parameters())
    if len({p.device for p in params}) != 1:
        return "parameters are spread over several devices"
    if params[0].device.type != "cpu":
        return "the fused step runs on CPU only"
    return None


def decoder_for(model: Any) -> Optional["FusedDecoder"]:
    """A FusedDecoder for `model`, or None when it must keep its own forward."""
    if unsupported_reason(model) is not None or not GUARD.trusted(model, lambda: _probe(model)):
        return None
    return FusedDecoder(model)


@torch.no_grad()
def _probe(model: Any) -> Optional[str]:
    """A prefill on two prompts (one left-padded) and three fused steps, against the model's own
    forward on the whole sequences: the same next-token logits at each step."""
    device = model.lm_head.weight.device
    vocab, P, steps = model.lm_head.out_features, 5, 3
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (2, P + steps), generator=g).to(device)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    pos = position_ids_from_mask(mask)
    was_training = model.training
    model.eval()
    try:
        whole = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits
        out = model(input_ids=ids[:, :P], attention_mask=mask[:, :P], position_ids=pos[:, :P],
                    use_cache=True)
        decoder = FusedDecoder(model)
        decoder.start(output_cache(out), mask[:, :P], P + steps)
        ours = [decoder.step(ids[:, P + t], pos[:, P + t]) for t in range(steps)]
        decoder.finish()
    finally:
        model.train(was_training)
    for t, logits in enumerate(ours):
        problem = mismatch(f"logits at step {t + 1}", logits, whole[:, P + t])
        if problem is not None:
            return f"its probe disagrees with the model: {problem}"
    return None


def _cache_kv(cache: Any, i: int) -> tuple[Tensor, Tensor]:
    """Layer i's (keys, values), each (B, H_kv, P, head_dim), from a transformers cache."""
    if hasattr(cache, "layers"):
        return cache.layers[i].keys, cache.layers[i].values
    if hasattr(cache, "key_cache"):
        return cache.key_cache[i], cache.value_cache[i]
    return cache[i][0], cache[i][1]


def _cat_bias(*linears: torch.nn.Linear) -> Optional[Tensor]:
    if all(m.bias is None for m in linears):
        return None
    return torch.cat([m.bias if m.bias is not None else m.weight.new_zeros(m.out_features)
                      for m in linears])


class FusedDecoder:
    """`start` once per rollout (after the prefill), then `step` once per generated token."""

    def __init__(self, model: Any):
        self.model = model
        cfg = model.config
        self.heads = cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or self.heads
        self.window = getattr(cfg, "sliding_window", None)
        self.finish()  # no rollout yet: no buffers

    def fits(self, total_length: int) -> bool:
        """False when a sliding window would cut into the sequence (the model's forward then
        applies it; this step does not), or when the model has left the CPU since."""
        on_cpu = self.model.lm_head.weight.device.type == "cpu"
        return on_cpu and (self.window is None or total_length <= self.window)

    @torch.no_grad()
    def start(self, cache: Any, attention_mask: Tensor, max_len: int) -> None:
        """Take over the prefill's cache. attention_mask: (B, P) of the prompts; max_len: the
        longest sequence the cache must hold (P + response length)."""
        body = self.model.model
        B, P = attention_mask.shape
        self.layers, self.keys, self.values = [], [], []
        for i, layer in enumerate(body.layers):
            a, m = layer.self_attn, layer.mlp
            k, v = _cache_kv(cache, i)
            keys = k.new_empty((B, k.shape[1], max_len, k.shape[3]))
            values = v.new_empty((B, v.shape[1], max_len, v.shape[3]))
            keys[:, :, :P] = k
            values[:, :, :P] = v
            self.keys.append(keys)
            self.values.append(values)
            self.layers.append((
                layer.input_layernorm,
                torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]),
                _cat_bias(a.q_proj, a.k_proj, a.v_proj),
                a.o_proj.weight, a.o_proj.bias, layer.post_attention_layernorm,
                torch.cat([m.gate_proj.weight, m.up_proj.weight]), _cat_bias(m.gate_proj, m.up_proj),
                m.down_proj.weight, m.down_proj.bias, m.act_fn, a.head_dim, a.scaling,
                (a.q_norm, a.k_norm) if type(self.model).__name__ in HEAD_NORMS else None))
        dtype = self.keys[0].dtype
        # Additive mask over the cache: -inf on the prompts' left padding, 0 on everything written.
        self.mask = torch.full((B, 1, 1, max_len), float("-inf"), dtype=dtype, device=attention_mask.device)
        self.mask[:, 0, 0, :P].masked_fill_(attention_mask.bool(), 0.0)
        self.length = P

    def finish(self) -> None:
        """Drop the rollout's KV buffers and concatenated weights."""
        self.layers: list[tuple] = []  # per layer: norms, fused weights and biases, act, sizes, q/k norms
        self.keys: list[Tensor] = []  # per layer (B, H_kv, max_len, head_dim)
        self.values: list[Tensor] = []
        self.mask: Optional[Tensor] = None  # (B, 1, 1, max_len) additive
        self.length = 0  # positions written so far

    def select(self, index: Tensor) -> None:
        """Keep the rows `index` (B',) of the buffers, in that order (rows may repeat)."""
        self.keys = [k.index_select(0, index) for k in self.keys]
        self.values = [v.index_select(0, index) for v in self.values]
        self.mask = self.mask.index_select(0, index)

    def grow(self, max_len: int) -> None:
        """Room for `max_len` positions in all (what is written is kept)."""
        capacity = self.mask.shape[-1]
        if max_len <= capacity:
            return
        n = self.length
        for buffers in (self.keys, self.values):
            for i, t in enumerate(buffers):
                bigger = t.new_empty((t.shape[0], t.shape[1], max_len, t.shape[3]))
                bigger[:, :, :n] = t[:, :, :n]
                buffers[i] = bigger
        mask = self.mask.new_full((*self.mask.shape[:-1], max_len), float("-inf"))
        mask[..., :n] = self.mask[..., :n]
        self.mask = mask

    def hide(self, rows: Tensor, slots: Tensor) -> None:
        """Positions no later token may attend to: (rows[i], slots[i]) for each i."""
        self.mask[rows, 0, 0, slots] = float("-inf")

    @torch.no_grad()
    def extend(self, tokens: Tensor, positions: Tensor, valid: Tensor) -> Tensor:
        """Feed S tokens per row at once (what a context adds between two turns of an episode):
        tokens, positions (B, S) long; valid (B, S) bool, False on a row's stand-in tokens
        (padding), which are written but hidden. Each token attends to the cache and to the
        valid tokens before it in the chunk. Returns the logits after each row's last column
        (B, V). The same layer function as `step`, computed for S query positions."""
        body = self.model.model
        B, S = tokens.shape
        n = self.length
        self.mask[:, 0, 0, n:n + S] = torch.where(valid, 0.0, float("-inf")).to(self.mask.dtype)
        # (B, 1, S, n + S): the cache as masked, and causal within the chunk
        causal = torch.full((S, S), float("-inf"), dtype=self.mask.dtype, device=tokens.device).triu(1)
        mask = self.mask[..., :n + S].expand(B, 1, S, n + S).clone()
        mask[..., n:] = mask[..., n:] + causal
        h = body.embed_tokens(tokens)  # (B, S, d)
        cos, sin = body.rotary_emb(h, positions)  # (B, S, head_dim) each
        cos, sin = cos[:, :, None], sin[:, :, None]
        H, Hk = self.heads, self.kv_heads
        lin = torch.nn.functional.linear
        for i, (norm1, w_qkv, b_qkv, w_o, b_o, norm2, w_gu, b_gu, w_down, b_down, act, hd, scale, head_norms
                ) in enumerate(self.layers):
            qkv = lin(norm1(h), w_qkv, b_qkv)  # (B, S, (H + 2 Hk) hd)
            qk = qkv[..., :(H + Hk) * hd].reshape(B, S, H + Hk, hd)
            if head_norms is not None:
                qk = torch.cat([head_norms[0](qk[:, :, :H]), head_norms[1](qk[:, :, H:])], dim=2)
            qk = qk * cos + rotate_half(qk) * sin
            self.keys[i][:, :, n:n + S] = qk[:, :, H:].transpose(1, 2)
            self.values[i][:, :, n:n + S] = qkv[..., (H + Hk) * hd:].reshape(B, S, Hk, hd).transpose(1, 2)
            q = qk[:, :, :H].transpose(1, 2)  # (B, H, S, hd)
            k = self.keys[i][:, :, :n + S].repeat_interleave(H // Hk, dim=1)
            v = self.values[i][:, :, :n + S].repeat_interleave(H // Hk, dim=1)
            weights = torch.softmax(q @ k.transpose(-1, -2) * scale + mask, dim=-1)
            o = (weights @ v).transpose(1, 2).reshape(B, S, H * hd)
            h = h + lin(o, w_o, b_o)
            gu = lin(norm2(h), w_gu, b_gu)
            inner = gu.shape[-1] // 2
            h = h + lin(act(gu[..., :inner]) * gu[..., inner:], w_down, b_down)
        self.length = n + S
        head = self.model.lm_head
        return lin(body.norm(h[:, -1]), head.weight, head.bias)

    @torch.no_grad()
    def step(self, token: Tensor, position: Tensor, valid: Optional[Tensor] = None) -> Tensor:
        """Feed one token per row. token: (B,) long; position: (B,) its position id; valid:
        (B,) bool, the rows whose token later tokens attend to (None: all; a row's stand-in
        token, e.g. padding, is then written but hidden). Returns the next-token logits (B, V)."""
        body, linear = self.model.model, _linear_transposed
        B, n = token.shape[0], self.length
        if valid is None:
            self.mask[:, 0, 0, n] = 0.0
        else:
            self.mask[:, 0, 0, n] = torch.where(valid, 0.0, float("-inf")).to(self.mask.dtype)
        mask = self.mask[..., :n + 1]
        h = body.embed_tokens(token)  # (B, d)
        cos, sin = body.rotary_emb(h, position[:, None])  # (B, 1, head_dim) each
        H, Hk = self.heads, self.kv_heads
        for i, (norm1, w_qkv, b_qkv, w_o, b_o, norm2, w_gu, b_gu, w_down, b_down, act, hd, scale, head_norms
                ) in enumerate(self.layers):
            # (B, (H + 2 Hk) hd), made contiguous: flash attention needs stride 1 along hd
            qkv = linear(norm1(h), w_qkv, b_qkv).contiguous()
            qk = qkv[:, :(H + Hk) * hd].reshape(B, H + Hk, hd)  # q and k heads, rotated together
            if head_norms is not None:
                qk = torch.cat([head_norms[0](qk[:, :H]), head_norms[1](qk[:, H:])], dim=1)
            qk = qk * cos + rotate_half(qk) * sin
            q = qk[:, :H]
            self.keys[i][:, :, n] = qk[:, H:]
            self.values[i][:, :, n] = qkv[:, (H + Hk) * hd:].reshape(B, Hk, hd)
            # The H // Hk query heads that share a K/V head are rows of one attention call.
            o = _attend(q.reshape(B, Hk, H // Hk, hd), self.keys[i][:, :, :n + 1],
                        self.values[i][:, :, :n + 1], mask, scale)  # (B, Hk, H // Hk, hd)
            h = h + linear(o.reshape(B, H * hd), w_o, b_o)
            gu = linear(norm2(h), w_gu, b_gu)
            inner = gu.shape[1] // 2
            h = h + linear(act(gu[:, :inner]) * gu[:, inner:], w_down, b_down)
        self.length = n + 1
        head = self.model.lm_head
        return linear(body.norm(h), head.weight, head.bias)


def _attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float) -> Tensor:
    """softmax(q k^T * scale + mask) v for a few query rows per head: q (B, Hk, G, hd), k and v
    (B, Hk, n, hd), mask (B, 1, 1, n) additive. Two batched matmuls and a softmax: with one
    query row, torch's CPU flash-attention kernel is slower than these (measured on the online
    benchmark's rollout, 64 rows x 32 tokens: 0.45 s instead of 0.49 s, medians of 18)."""
    B, Hk, G, hd = q.shape
    n = k.shape[2]
    scores = torch.baddbmm(mask.expand(B, Hk, G, n).reshape(B * Hk, G, n), q.reshape(B * Hk, G, hd),
                           k.reshape(B * Hk, n, hd).transpose(1, 2), alpha=scale)
    return torch.bmm(torch.softmax(scores, dim=-1), v.reshape(B * Hk, n, hd)).view(B, Hk, G, hd)


def _linear_transposed(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """x @ weight^T + bias computed as (weight @ x^T)^T: the faster orientation on CPU for a
    few rows (see the module docstring). Returns a transposed (B, out) view."""
    out = torch.mm(weight, x.t()) if bias is None else torch.addmm(bias[:, None], weight, x.t())
    return out.t()
