"""The world's base model: a tiny Llama (about 0.9M parameters) on the world tokenizer.

`base_model_config(tokenizer_dir)` gives its `transformers.LlamaConfig`;
`init_base_model(out_dir, tokenizer_dir, seed)` writes an untrained `LlamaForCausalLM` and
the tokenizer as a standard Hugging Face directory (config.json, model.safetensors,
tokenizer files), ready for pretraining with the SFT loop on the world corpus.
"""

HIDDEN_SIZE = 128
NUM_LAYERS = 4
NUM_HEADS = 4
INTERMEDIATE_SIZE = 384  # 3x hidden: the SwiGLU MLP has three matrices, so ~8/3x is usual
MAX_POSITIONS = 128  # a prompt (~15 tokens) plus a response (<= 64) fits with room to spare
# Weights start with std 1/sqrt(width), not transformers' default 0.02 (a scale for wide models).
# At 0.02 a model this narrow sits on a long plateau where attention ignores content: after
# 400 pretraining steps it still could not copy a word from earlier in its context (it gave the
# place a story had named 1/24 probability, the uniform guess). At 1/sqrt(width) it learns to
# copy from a copy-rich corpus within 100 steps. See "Tokenizer and base model" in docs/world.md.
INIT_STD = HIDDEN_SIZE**-0.5


def base_model_config(tokenizer_dir: str):
    """Tokenizer directory -> LlamaConfig sized for the world, with its special-token ids."""
    from transformers import AutoTokenizer, LlamaConfig

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=HIDDEN_SIZE,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=NUM_HEADS,
        num_key_value_heads=NUM_HEADS,
        intermediate_size=INTERMEDIATE_SIZE,
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=True,  # the embedding is a large share of a model this small
        initializer_range=INIT_STD,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def init_base_model(out_dir: str, tokenizer_dir: str, seed: int = 0) -> str:
    """Write an untrained LlamaForCausalLM (seeded init) and the tokenizer to out_dir -> out_dir."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    from tether.world.tokenizer import save_tokenizer

    config = base_model_config(tokenizer_dir)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = config.pad_token_id
    model.save_pretrained(out_dir, safe_serialization=True)
    save_tokenizer(AutoTokenizer.from_pretrained(tokenizer_dir), out_dir)
    return out_dir
