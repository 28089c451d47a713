"""Shared pieces of the benchmarks: locally built Llama models, a word-level tokenizer, the
machine's fp32 matmul peak, and an analytic FLOP count of Llama forward passes.

Nothing here needs the network: every model is built from a config with a fixed seed.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import torch

# Special tokens of the benchmark tokenizer (ids 0..3); every other id is a plain word "w<id>".
PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
SPECIAL_IDS = [PAD_ID, BOS_ID, EOS_ID, UNK_ID]
FIRST_WORD_ID = 4


@dataclass(frozen=True)
class LlamaShape:
    """The few numbers that decide a Llama's size and its FLOPs."""

    hidden: int = 256
    layers: int = 4
    heads: int = 4
    kv_heads: int = 4
    intermediate: int = 688  # ~8/3 x hidden rounded up to a multiple of 16, as Llama does
    vocab: int = 4096
    max_positions: int = 256
    tie_embeddings: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def layer_matmul_params(self) -> int:
        """Weights of one decoder layer that take part in a matmul (norms excluded)."""
        kv = self.kv_heads * self.head_dim
        attn = self.hidden * self.hidden * 2 + self.hidden * kv * 2  # q, o + k, v
        mlp = 3 * self.hidden * self.intermediate  # gate, up, down
        return attn + mlp

    def query_side_params(self) -> int:
        """Weights of one decoder layer used per query position: q, o and the MLP (k and v are
        needed at every position a later query attends to)."""
        return self.hidden * self.hidden * 2 + 3 * self.hidden * self.intermediate

    def trunk_matmul_params(self) -> int:
        """Non-embedding matmul weights of the trunk (all layers; no embedding, no lm_head)."""
        return self.layers * self.layer_matmul_params()


def build_tokenizer(vocab: int, out_dir: str | Path) -> Any:
    """A WordLevel tokenizer over `vocab` synthetic words, saved as PreTrainedTokenizerFast.

    It adds <bos> in front of every text (TemplateProcessing), so a prompt of n words is n+1 ids.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = {PAD: PAD_ID, BOS: BOS_ID, EOS: EOS_ID, UNK: UNK_ID}
    words.update({f"w{i}": i for i in range(FIRST_WORD_ID, vocab)})
    tok = Tokenizer(models.WordLevel(vocab=words, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, BOS_ID)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS,
                                   pad_token=PAD, unk_token=UNK, padding_side="left")
    fast.save_pretrained(str(out_dir))
    return fast


def llama_config(shape: LlamaShape) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads, max_position_embeddings=shape.max_positions,
        tie_word_embeddings=shape.tie_embeddings, bos_token_id=BOS_ID, eos_token_id=EOS_ID,
        pad_token_id=PAD_ID, attention_dropout=0.0)


def build_policy(shape: LlamaShape, out_dir: str | Path, seed: int = 0,
                 block_special: bool = True) -> Path:
    """Random-init LlamaForCausalLM (fixed seed) plus tokenizer, saved as an HF directory.

    With `block_special`, the model itself can never emit <pad>/<bos>/<eos>/<unk>: a logits bias
    built into the weights, so that it holds for any sampler (TRL's generate, tether's own
    loop) without a sampler option. Residual dimension 0 is made a positive constant (embedding
    column 0 = 0.1, and no layer writes to it: row 0 of every o_proj and down_proj is zero), so
    after the final RMSNorm it is always about +5; the LM-head rows of the special tokens read
    only that dimension with weight -50, which puts their logits near -240 (probability 0 in
    fp32). Every response therefore has exactly max_new_tokens tokens and nothing is truncated.
    The FLOPs are those of the plain architecture.
    """
    from transformers import LlamaForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(llama_config(shape))
    if block_special:
        assert not shape.tie_embeddings, "the special-token bias needs an untied LM head"
        with torch.no_grad():
            model.model.embed_tokens.weight[:, 0] = 0.1
            for layer in model.model.layers:
                layer.self_attn.o_proj.weight[0, :] = 0.0
                layer.mlp.down_proj.weight[0, :] = 0.0
            head = model.get_output_embeddings().weight
            head[SPECIAL_IDS, :] = 0.0
            head[SPECIAL_IDS, 0] = -50.0
    model.generation_config.bos_token_id = BOS_ID
    model.generation_config.eos_token_id = EOS_ID
    model.generation_config.pad_token_id = PAD_ID
    model.save_pretrained(str(out))
    build_tokenizer(shape.vocab, out)
    return out


def build_reward_model(policy_dir: str | Path, out_dir: str | Path, seed: int = 0) -> Path:
    """AutoModelForSequenceClassification(num_labels=1) initialised from the policy checkpoint;
    the new head is N(0, 1/(d+1)) with a fixed seed. Saved with the tokenizer."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = AutoModelForSequenceClassification.from_pretrained(str(policy_dir), num_labels=1)
    model.config.pad_token_id = PAD_ID
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        d = model.score.weight.shape[-1]
        model.score.weight.copy_(torch.randn(model.score.weight.shape, generator=gen) / (d + 1) ** 0.5)
    model.save_pretrained(str(out))
    AutoTokenizer.from_pretrained(str(policy_dir)).save_pretrained(str(out))
    return out


def synthetic_prompts(n: int, words_per_prompt: int, vocab: int, seed: int = 0) -> list[str]:
    """n texts of `words_per_prompt` random non-special words (fixed seed)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(FIRST_WORD_ID, vocab, (n, words_per_prompt), generator=gen)
    return [" ".join(f"w{i}" for i in row.tolist()) for row in ids]


# ----------------------------------------------------------------------------- FLOPs
#
# Conventions (used everywhere below):
# * a matmul of an (m x k) by a (k x n) matrix is 2*m*k*n FLOPs; elementwise work (norms,
#   activations, softmax, rotary, the optimizer) is not counted;
# * per token, a forward through the trunk costs 2 * trunk_matmul_params, plus attention:
#   QK^T and attn*V cost 2*L*d each (L = the number of keys the query attends to, d = hidden),
#   counted causally (the useful work: token i attends to i+1 keys, or to the cache);
# * the lm_head costs 2*hidden*vocab per position whose logits are computed; a scalar head
#   (critic/RM, hidden -> 1) costs 2*hidden per position;
# * the embedding lookup is free; a backward pass costs 2x its forward (grads for inputs and
#   weights), so a training step is 3x the forward.


def attention_flops_full(shape: LlamaShape, seq_len: int) -> float:
    """QK^T + AV over one causal sequence of seq_len tokens, all layers."""
    keys = seq_len * (seq_len + 1) / 2  # sum over queries of the keys each attends to
    return shape.layers * 4.0 * shape.hidden * keys


def forward_flops(shape: LlamaShape, n_seqs: int, seq_len: int, head: str,
                  head_positions: Optional[int] = None, last_layer_rows: Optional[int] = None) -> float:
    """One forward over n_seqs full sequences of seq_len tokens.

    head: "lm" (vocab logits), "scalar" (hidden -> 1, a critic or RM) or "none".
    head_positions: how many positions per sequence get the head (default: all of them).
    last_layer_rows: the last layer computes queries, attention, o and MLP at the last this
    many positions only (keys and values everywhere), as `tether.models.tail` does; default all.
    """
    pos = seq_len if head_positions is None else head_positions
    trunk = 2.0 * shape.trunk_matmul_params() * seq_len + attention_flops_full(shape, seq_len)
    if last_layer_rows is not None and last_layer_rows < seq_len:
        skipped = seq_len - last_layer_rows  # the first positions, each attending to i + 1 keys
        trunk -= 2.0 * shape.query_side_params() * skipped
        trunk -= 4.0 * shape.hidden * skipped * (skipped + 1) / 2
    head_cost = {"lm": 2.0 * shape.hidden * shape.vocab, "scalar": 2.0 * shape.hidden, "none": 0.0}[head]
    return n_seqs * (trunk + head_cost * pos)


def generation_flops(shape: LlamaShape, n_seqs: int, prompt_len: int, new_tokens: int,
                     prefill_logits: int = 1) -> float:
    """Sampling new_tokens tokens with a KV cache (what HF generate does).

    Prefill: one forward over the prompt that produces token 1 (lm_head on `prefill_logits`
    positions; HF generate passes logits_to_keep=1). Then new_tokens-1 one-token forwards, the
    step producing token t+1 attending to prompt_len + t cached keys (itself included).
    """
    prefill = forward_flops(shape, n_seqs, prompt_len, "lm", head_positions=prefill_logits)
    per_token = 2.0 * shape.trunk_matmul_params() + 2.0 * shape.hidden * shape.vocab
    decode = 0.0
    for t in range(1, new_tokens):
        keys = prompt_len + t
        decode += per_token + shape.layers * 4.0 * shape.hidden * keys
    return prefill + n_seqs * decode


# ----------------------------------------------------------------------------- peak


def matmul_peak_gflops(sizes: tuple[int, ...] = (1024, 2048), reps: int = 5) -> dict[str, Any]:
    """fp32 torch.matmul GFLOP/s with torch's default threads: best of `reps` per size, and the
    best over sizes. One warm-up matmul per size is not timed."""
    best: dict[str, float] = {}
    for n in sizes:
        a = torch.randn(n, n)
        b = torch.randn(n, n)
        c = torch.empty(n, n)
        torch.matmul(a, b, out=c)  # warm-up
        flops = 2.0 * n ** 3
        top = 0.0
        for _ in range(reps):
            t0 = time.perf_counter()
            torch.matmul(a, b, out=c)
            dt = time.perf_counter() - t0
            top = max(top, flops / dt / 1e9)
        best[str(n)] = top
    return {"by_size": best, "best": max(best.values())}


# ----------------------------------------------------------------------------- misc


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def machine_info() -> dict[str, Any]:
    import transformers

    info: dict[str, Any] = {
        "python": platform.python_version(), "torch": torch.__version__,
        "transformers": transformers.__version__, "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(), "machine": platform.machine(),
        "cuda": torch.cuda.is_available(),
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return info


def write_json(path: str | Path, payload: dict[str, Any]) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(p.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=_json_default) + "\n")
    os.replace(tmp, p)


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "__dataclass_fields__"):
        return asdict(obj)
    return str(obj)
