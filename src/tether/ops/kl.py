"""Per-token estimators of KL(pi || ref) and the controllers that set the KL coefficient.

The estimators take log-probabilities of tokens sampled from pi (Schulman, "Approximating
KL divergence", 2020). With d = logref - logp and r = exp(d) = ref/pi:
  k1 = -d             unbiased, high variance, can be negative per token. The PPO reward uses it.
  k2 = d^2 / 2        biased, low variance, always >= 0.
  k3 = (r - 1) - d    unbiased, low variance, always >= 0. Use it when KL is a loss term.
All three take and return tensors of one shape, e.g. (B, T).
"""

import torch
from torch import Tensor


def kl_k1(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """k1 = logp - logref. logprobs, ref_logprobs: same shape; returns that shape."""
    return logprobs - ref_logprobs


def kl_k2(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """k2 = 0.5 * (logp - logref)^2. logprobs, ref_logprobs: same shape; returns that shape."""
    return 0.5 * (logprobs - ref_logprobs) ** 2


def kl_k3(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """k3 = (r - 1) - log r with r = exp(logref - logp); >= 0 since e^d >= 1 + d.
    logprobs, ref_logprobs: same shape; returns that shape."""
    d = ref_logprobs - logprobs
    # expm1 keeps r - 1 accurate when the policies are close (d near 0), where k3 ~ d^2/2.
    return torch.expm1(d) - d


class FixedKLController:
    """A constant KL coefficient beta. Has the same methods as AdaptiveKLController so a
    recipe can call `update` without knowing which one it holds."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Does nothing: beta is fixed."""

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Moves beta so that the measured KL tracks `target` (Ziegler et al. 2019, sec. 2.2).

    Each update: e = clip(KL / target - 1, -0.2, 0.2), then beta *= 1 + e * n_steps / horizon.
    The clip bounds how fast beta reacts to one noisy KL estimate; `horizon` (in samples)
    sets how many samples it takes to move beta by about a factor of e^0.2.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: int):
        if target <= 0 or horizon <= 0:
            raise ValueError(f"target and horizon must be > 0, got {target}, {horizon}")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = int(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        """current_kl: the KL measured on the last batch (per sequence, as in the paper);
        n_steps: how many samples (sequences) that batch held."""
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict:
        # Only beta is state; target and horizon come from the config on resume.
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])
