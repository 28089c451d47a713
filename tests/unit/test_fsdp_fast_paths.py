"""The tail and the fused decode step read a layer's weights themselves, so they must step aside
for a model sharded with FSDP2 (`--fsdp`); its own forward runs instead. One process, a gloo
group of size 1: the parameters are DTensors all the same."""

import pytest
import torch

from tether.models.tail import last_layer
from tether.rollout.decode import decoder_for, unsupported_reason


@pytest.fixture
def sharded_llama(tiny_models, tmp_path):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from transformers import AutoModelForCausalLM

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"]).eval()
        plain = AutoModelForCausalLM.from_pretrained(tiny_models["llama"]).eval()
        mesh = init_device_mesh("cpu", (1,))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        yield model, plain
    finally:
        dist.destroy_process_group()


def test_fast_paths_step_aside_for_sharded_parameters(sharded_llama):
    model, plain = sharded_llama
    assert last_layer(plain) is not None and unsupported_reason(plain) is None  # they would apply
    assert last_layer(model) is None
    assert unsupported_reason(model) is not None and decoder_for(model) is None
    ids = torch.tensor([[1, 7, 3, 9, 4]])
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, plain(ids).logits, atol=1e-5)


def test_gathered_keeps_each_layer_whole_until_the_block_ends(sharded_llama):
    from tether.training.fsdp import gathered, is_sharded

    model, plain = sharded_llama
    layer = model.model.layers[0]
    ids = torch.tensor([[1, 7, 3, 9, 4]])
    with torch.no_grad():
        model(ids)
        assert is_sharded(layer)  # by default a layer's weights are freed after each forward
        with gathered(model):
            assert is_sharded(layer)  # nothing is gathered before it is used
            logits = model(ids).logits
            assert not is_sharded(layer)  # gathered once, then kept for the next forwards
            assert torch.allclose(model(ids).logits, logits)
        assert is_sharded(layer)  # freed at the end of the block
        assert torch.allclose(model(ids).logits, plain(ids).logits, atol=1e-5)
        model(ids)
        assert is_sharded(layer)  # and freed after each forward again, as before the block
