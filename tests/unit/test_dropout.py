"""disable_dropout turns off every dropout a model applies in train mode."""

import pytest
import torch

from tether.models.load import disable_dropout


def _model(arch: str):
    import transformers as T

    torch.manual_seed(0)
    if arch == "llama":  # attention copies config.attention_dropout into a float at build time
        cfg = T.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, vocab_size=100, attention_dropout=0.5)
    elif arch == "qwen2":
        cfg = T.Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, vocab_size=100, attention_dropout=0.5)
    else:  # nn.Dropout modules
        cfg = T.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=100, resid_pdrop=0.5, embd_pdrop=0.5,
                           attn_pdrop=0.5)
    return T.AutoModelForCausalLM.from_config(cfg).train()


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_train_mode_forwards_are_deterministic_once_dropout_is_disabled(arch):
    model, ids = _model(arch), torch.randint(5, 100, (2, 8))
    assert not torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)  # dropout is on
    disable_dropout(model)
    assert model.training
    assert torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)
    assert torch.equal(model(input_ids=ids).logits, model.eval()(input_ids=ids).logits)
