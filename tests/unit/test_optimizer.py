"""tether's AdamW: fused where torch has the kernel, and the same update as the default one."""

import torch

from tether.training.optim import adamw


def _params(seed: int) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(7, 5, generator=gen)), torch.nn.Parameter(torch.randn(5, generator=gen))]


def test_cpu_float_parameters_get_the_fused_kernel_and_groups_keep_their_lrs():
    a, b = _params(0)
    opt = adamw([{"params": [a], "lr": 1e-3}, {"params": [b], "lr": 1e-2}], eps=1e-5, weight_decay=0.0)
    assert opt.defaults["fused"] is True
    assert [g["lr"] for g in opt.param_groups] == [1e-3, 1e-2]


def test_fused_steps_match_the_default_adamw():
    fused, plain = _params(1), _params(1)
    opts = [adamw(fused, lr=1e-2, eps=1e-5, weight_decay=0.01),
            torch.optim.AdamW(plain, lr=1e-2, eps=1e-5, weight_decay=0.01)]
    gen = torch.Generator().manual_seed(2)
    for _ in range(5):
        grads = [torch.randn(p.shape, generator=gen) for p in fused]
        for params, opt in zip((fused, plain), opts):
            for p, g in zip(params, grads):
                p.grad = g.clone()
            opt.step()
    for p, q in zip(fused, plain):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)


def test_devices_without_a_fused_kernel_get_the_default_implementation():
    # torch has fused AdamW for CPU and CUDA tensors only; anything else must not ask for it
    opt = adamw([torch.nn.Parameter(torch.zeros(3, device="meta"))], lr=1e-3)
    assert not opt.defaults["fused"]
