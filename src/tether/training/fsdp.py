"""Sharded training with torch's FSDP2 (`fully_shard`), under accelerate's process group.

`--fsdp` shards each decoder layer and then the root module over every process of the launch
(`accelerate launch --multi_gpu --num_processes N`, which gives gloo on CPUs and NCCL on GPUs):
each process holds 1/N of every parameter, gradient and optimizer state as DTensor shards, and a
layer's full weights exist only while it runs (all-gathered before, freed after; gradients are
reduce-scattered). The model is not also wrapped in accelerate's DDP. One code path for CPU and
GPU, as torchtune does it. The engine is torch's; what is tether's is only where it is applied
and how its state is written:

- checkpoints: every process writes its own shards of the weights, the optimizer state and its
  RNG state into `shard-R-of-N.safetensors` (plain tensors, nothing pickled), and resumes from
  them with the same N. torch.distributed.checkpoint would pickle its metadata, and no file of a
  run directory is ever unpickled.
- the final model: the full state dict is gathered (a collective every process joins) and the
  main process writes one plain Hugging Face directory, which `from_pretrained` loads anywhere.
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import torch
from torch import nn

from tether.errors import ConfigError
from tether.training.memory import release_freed_memory

log = logging.getLogger("tether")

SHARD_META = "shards.json"


def require_processes(accelerator: Any) -> None:
    if accelerator.num_processes < 2:
        raise ConfigError("--fsdp shards the model over the processes of the launch, and this one "
                          "has a single process. Launch with `accelerate launch --multi_gpu "
                          "--num_processes N` (N >= 2; on CPUs too), or drop --fsdp.")


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks: the longest ModuleList whose entries are all of one class
    (model.layers for Llama, Qwen2 and Mistral, transformer.h for GPT-2, gpt_neox.layers)."""
    best: list[nn.Module] = []
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > len(best) and len(module) > 0 \
                and len({type(m) for m in module}) == 1:
            best = list(module)
    return best


def _mesh(accelerator: Any) -> Any:
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(accelerator.device.type, (accelerator.num_processes,))


def shard_whole(module: nn.Module, accelerator: Any) -> nn.Module:
    """fully_shard on one small module that is called on its own (PPO's value head): its own
    root, gathered when it runs."""
    from torch.distributed.fsdp import fully_shard

    require_processes(accelerator)
    fully_shard(module, mesh=_mesh(accelerator))
    return module


def _scalar_parts(model: nn.Module) -> Optional[tuple[nn.Module, nn.Module]]:
    """(trunk, head) of a sequence-classification model (a reward model or a critic), whose
    trunk tether also calls on its own (models/reward.py reads its hidden states); None for a
    causal LM, which is only ever called whole."""
    from tether.models.reward import HEAD_NAMES

    if model.get_output_embeddings() is not None:
        return None
    heads = [getattr(model, n) for n in HEAD_NAMES if isinstance(getattr(model, n, None), nn.Module)]
    trunk = getattr(model, "base_model", None)
    if not heads or trunk is None or trunk is model:
        return None
    return trunk, heads[0]


def shard(model: nn.Module, accelerator: Any) -> nn.Module:
    """Apply fully_shard to every decoder layer, then to the root (in place; returns model).
    Trainable or frozen alike: a frozen model's shards simply get no gradients.

    The root is what must be called: a model sharded this way is never called through a
    wrapper that is sharded too (FSDP2 wants the outermost sharded module called first). A
    sequence-classification model has two roots, its trunk and its head, since tether calls
    the trunk alone (per-token values, the score at the last token) as well as the whole."""
    from torch.distributed.fsdp import fully_shard

    require_processes(accelerator)
    layers = decoder_layers(model)
    if not layers:
        raise ConfigError(f"--fsdp found no repeated decoder layers in {type(model).__name__} to "
                          "shard; train it without --fsdp")
    mesh = _mesh(accelerator)
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    parts = _scalar_parts(model)
    roots = [model] if parts is None else list(parts)
    for root in roots:
        fully_shard(root, mesh=mesh)
        if _frozen(root):  # no backward follows its forwards: free a root's weights after them
            root.set_reshard_after_forward(True, recurse=False)
    left = [n for n, p in model.named_parameters() if not is_sharded_tensor(p)]
    if left:
        raise ConfigError(f"--fsdp left {len(left)} parameter(s) of {type(model).__name__} unsharded "
                          f"(e.g. {left[0]}); run it without --fsdp")
    log.info("fsdp: %s: %d decoder layers and %d root(s) sharded over %d processes",
             type(model).__name__, len(layers), len(roots), accelerator.num_processes)
    release_freed_memory()  # the whole weights this process loaded, now replaced by its shards
    return model


def place(model: nn.Module, accelerator: Any, sharded: bool) -> nn.Module:
    """`model` on the launch's device, and sharded when `sharded` (a stage's --fsdp)."""
    model.to(accelerator.device)
    return shard(model, accelerator) if sharded else model


def _frozen(module: nn.Module) -> bool:
    return not any(p.requires_grad for p in module.parameters())


def is_sharded_tensor(t: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


@contextlib.contextmanager
def gathered(model: nn.Module) -> Iterator[None]:
    """Within the block, each sharded module of `model` keeps its full weights once its first
    forward has gathered them, instead of freeing them after every forward; they are freed
    (resharded) at the end. For sampling: one forward per token would otherwise all-gather every
    layer again for every token. It costs the memory of the whole weights, once, for the
    block's duration (not their gradients or optimizer state). Anything else runs as it is."""
    from torch.distributed.fsdp import FSDPModule

    modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
    inner = {id(sub) for m in modules for sub in m.modules() if sub is not m}
    for m in modules:
        m.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for m in modules:
            m.reshard()
            # back to what `shard` set: a trained root keeps its weights after a forward, as
            # the backward that follows needs them at once; the rest free them
            m.set_reshard_after_forward(id(m) in inner or _frozen(m), recurse=False)


def is_sharded(model: Any) -> bool:
    return any(is_sharded_tensor(p) for p in model.parameters())


def local(t: torch.Tensor) -> torch.Tensor:
    """This process's shard of a DTensor; any other tensor as it is."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def plain(t: Any) -> Any:
    """A DTensor's full value (a collective); anything else as it is."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def state_bytes(model: nn.Module, optimizer: Any) -> int:
    """Bytes of the weights and optimizer state this process holds (its shards under --fsdp,
    everything under DDP), gradients included when they are held at the time of the call."""
    total = 0
    for p in model.parameters():
        total += local(p).nbytes + (local(p.grad).nbytes if p.grad is not None else 0)
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper
    for state in inner.state.values():
        total += sum(local(v).nbytes for v in state.values() if torch.is_tensor(v))
    return total


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's state dict on the main process, on CPU (empty on the others). Every
    process must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def count_nonfinite(model: nn.Module) -> list[str]:
    """Names of parameters with a NaN or inf in any process's shard (a collective)."""
    import torch.distributed as dist

    named = list(model.named_parameters())
    bad = torch.tensor([0 if bool(torch.isfinite(local(p)).all()) else 1 for _, p in named], dtype=torch.int32)
    dist.all_reduce(bad)
    return [n for (n, _), b in zip(named, bad.tolist()) if b]


# ----------------------------------------------------------------------------- checkpoints


def _shard_file(path: Path, rank: int, world: int) -> Path:
    return path / f"shard-{rank}-of-{world}.safetensors"


def save_shards(path: Path, models: Sequence[nn.Module], optimizers: Sequence[Any], rank: int,
                world: int) -> None:
    """This process's shards of the weights and optimizer states, and its RNG state."""
    from safetensors.torch import save_file

    tensors = {f"model{i}.{n}": local(p).detach().contiguous()
               for i, model in enumerate(models) for n, p in model.named_parameters()}
    groups = []
    for k, optimizer in enumerate(optimizers):
        saved = optimizer.state_dict()
        for pid, state in saved["state"].items():
            for key, value in state.items():
                if torch.is_tensor(value):
                    tensors[f"optim{k}.{pid}.{key}"] = local(value).detach().contiguous()
        groups.append(saved["param_groups"])
    tensors["rng.torch"] = torch.get_rng_state()
    save_file(tensors, str(_shard_file(path, rank, world)))
    if rank == 0:
        (path / SHARD_META).write_text(json.dumps({"world_size": world, "param_groups": groups}))


def load_shards(path: Path, models: Sequence[nn.Module], optimizers: Sequence[Any], rank: int,
                world: int) -> None:
    """Restore what `save_shards` wrote, into the model and optimizers as built (sharded the
    same way). A checkpoint written by another number of processes is refused."""
    from safetensors.torch import load_file
    from torch.distributed.tensor import DTensor

    meta = json.loads((path / SHARD_META).read_text())
    if meta["world_size"] != world:
        raise ValueError(f"it was written by {meta['world_size']} processes and this launch has "
                         f"{world}; resume an --fsdp run with the same --num_processes")
    tensors = load_file(str(_shard_file(path, rank, world)))
    with torch.no_grad():
        for i, model in enumerate(models):
            for n, p in model.named_parameters():
                local(p).copy_(tensors[f"model{i}.{n}"])
    for k, optimizer in enumerate(optimizers):
        params = [p for group in optimizer.param_groups for p in group["params"]]
        state: dict[int, dict] = {}
        for pid, p in enumerate(params):
            entry = {}
            for key in ("step", "exp_avg", "exp_avg_sq"):
                value = tensors.get(f"optim{k}.{pid}.{key}")
                if value is None:
                    continue
                if isinstance(p, DTensor) and value.dim() > 0:
                    value = DTensor.from_local(value, p.device_mesh, p.placements, run_check=False,
                                               shape=p.shape, stride=p.stride())
                entry[key] = value
            if entry:
                state[pid] = entry
        optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"][k]})
    torch.set_rng_state(tensors["rng.torch"])
