"""One guard for the fast paths that re-implement part of a transformers model.

`tether.models.tail` (the last decoder layer at the read positions only),
`tether.rollout.decode` (the fused one-token decode step) and `tether.models.prefix` (one
prompt pass per distinct prompt, on a repeated cache) compute what a transformers model
computes, through its own modules but with their own control flow. A new transformers release
can change what they rely on (a renamed cache keyword, another mask format, a new norm) without
any error: the fast path would then compute something else. So none is trusted blindly:

- each declares the transformers releases (major.minor) its tests were run on; on any other
  release it steps aside;
- on first use for a model in a process, it runs a small probe through both the model's own
  forward and itself and compares the outputs (and, where gradients flow, the gradients);
- when the release is unknown or the probe disagrees (or raises), the model's own forward runs
  instead, and one warning says why.

The probes fork the RNG, so a run samples the same with or without them.
"""

from __future__ import annotations

import logging
import math
import weakref
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor

log = logging.getLogger("tether")


def transformers_release() -> str:
    import transformers

    parts = transformers.__version__.split(".")
    return ".".join(parts[:2])


class FastPath:
    """One fast path's verdicts: `trusted(model, probe)` is True once the release is a verified
    one and the probe has passed on that model (cached per model object, for the process)."""

    def __init__(self, name: str, verified: Sequence[str]):
        self.name = name
        self.verified = tuple(verified)  # transformers major.minor releases the suite passed on
        self._verdicts: "weakref.WeakKeyDictionary[Any, bool]" = weakref.WeakKeyDictionary()
        self._warned: set[str] = set()

    def release_problem(self) -> Optional[str]:
        release = transformers_release()
        if release in self.verified:
            return None
        return (f"transformers {release} is not a release it was verified on "
                f"({', '.join(self.verified)})")

    def trusted(self, model: Any, probe: Callable[[], Optional[str]]) -> bool:
        verdict = self._verdicts.get(model)
        if verdict is None:
            reason = self.release_problem() or self._run(probe)
            verdict = reason is None
            self._verdicts[model] = verdict
            if reason is not None:
                self._warn(reason)
        return verdict

    def forget(self) -> None:
        """Drop every verdict (tests that change what a probe would see)."""
        self._verdicts = weakref.WeakKeyDictionary()
        self._warned.clear()

    def _run(self, probe: Callable[[], Optional[str]]) -> Optional[str]:
        try:
            with torch.random.fork_rng(devices=[]):
                return probe()
        except Exception as err:  # a probe that cannot even run: the structure is not the known one
            return f"its self-check raised {type(err).__name__}: {err}"

    def _warn(self, reason: str) -> None:
        if reason in self._warned:
            return
        self._warned.add(reason)
        log.warning("%s steps aside and the model's own forward runs instead: %s", self.name, reason)


def mismatch(name: str, ours: Tensor, theirs: Tensor) -> Optional[str]:
    """None when `ours` equals `theirs` up to the rounding of the computation, else a message.

    A probe looks for a structural error (wrong rotary positions, wrong causal rows, a missing
    norm, a cache taken for no cache), which is off by a sizeable part of the tensor's magnitude;
    rounding is the unit tests' business. So the bound is a small part of the largest |value|:
    0.1% in float32 (gradients summed over positions in another order, with cancellation, differ
    by up to ~1e-5 of it) and 3% in half precision.
    """
    if ours.shape != theirs.shape:
        return f"{name}: shape {tuple(ours.shape)} where the model gives {tuple(theirs.shape)}"
    a, b = ours.detach().double(), theirs.detach().double()
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return f"{name}: non-finite values"
    scale = float(b.abs().max()) if b.numel() else 0.0
    eps = torch.finfo(theirs.dtype).eps if theirs.dtype.is_floating_point else 0.0
    tol = (3e-2 if eps > 1e-4 else 1e-3) * scale + 1e-12
    diff = float((a - b).abs().max()) if a.numel() else 0.0
    if diff > tol or math.isnan(diff):
        return f"{name}: differs from the model's own by {diff:.3g} (allowed {tol:.3g})"
    return None
