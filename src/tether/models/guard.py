"""One guard for the fast paths that re-implement part of a transformers model.

`tether.models.tail` (the last decoder layer at the read positions only),
`tether.rollout.decode` (the fused one-token decode step) and `tether.models.prefix` (one
prompt pass per distinct prompt, on a repeated cache) compute what a transformers model
computes, through its own modules but with their own control flow. A new transformers release
can change what they rely on (a renamed cache keyword, another mask format, a new norm) without
any error: the fast path would then compute something else. So none is trusted blindly:

- on first use for a model in a process, each runs a small probe through both the model's own
  forward and itself and compares the outputs (and, where gradients flow, the gradients), after
  a structural check where it has one (the tail's layer keywords);
- when the probe disagrees (or raises), the model's own forward runs instead, and one warning
  says why;
- each declares the transformers releases (major.minor) its tests were run on. On any other
  release the probe alone decides, and one warning names the release either way (the choice
  and why: docs/architecture.md, "Fast paths on a new transformers release").
  TETHER_FAST_PATHS=verified makes every fast path step aside on an unverified release instead.

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


# The transformers releases (major.minor) the fast paths' tests last passed on. tools/refresh-lock
# adds the newest release here when the suite passes on it; on any other release each fast path
# runs only after its probe passes on the model, with one warning naming the release.
VERIFIED_RELEASES = ("5.19", "5.23", "5.24", "5.25")


def transformers_release() -> str:
    import transformers

    parts = transformers.__version__.split(".")
    return ".".join(parts[:2])


class FastPath:
    """One fast path's verdicts: `trusted(model, probe)` is True once the release is a verified
    one and the probe has passed on that model (cached per model object, for the process)."""

    def __init__(self, name: str, verified: Sequence[str] = VERIFIED_RELEASES):
        self.name = name
        self.verified = tuple(verified)  # transformers major.minor releases the suite passed on
        self._verdicts: "weakref.WeakKeyDictionary[Any, bool]" = weakref.WeakKeyDictionary()
        self._warned: set[str] = set()

    def release_problem(self) -> Optional[str]:
        """None on a verified release; otherwise what is unverified about this one."""
        release = transformers_release()
        if release in self.verified:
            return None
        return (f"transformers {release} is not a release it was verified on "
                f"({', '.join(self.verified)})")

    def trusted(self, model: Any, probe: Callable[[], Optional[str]]) -> bool:
        verdict = self._verdicts.get(model)
        if verdict is None:
            unverified = self.release_problem()
            if unverified is not None and verified_only():
                reason = f"{unverified}, and TETHER_FAST_PATHS=verified"
            else:
                reason = self._run(probe)
                if reason is not None and unverified is not None:
                    reason = f"{unverified}, and {reason}"
            verdict = reason is None
            self._verdicts[model] = verdict
            if reason is not None:
                self._warn(f"steps aside and the model's own forward runs instead: {reason}")
            elif unverified is not None:
                self._warn(f"runs on {unverified}: its self-check against the model's own forward "
                           "passed on this model")
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

    def _warn(self, message: str) -> None:
        if message in self._warned:
            return
        self._warned.add(message)
        log.warning("%s %s", self.name, message)


def verified_only() -> bool:
    """TETHER_FAST_PATHS=verified: no fast path on a release its tests were not run on."""
    import os

    return os.environ.get("TETHER_FAST_PATHS", "").strip().lower() == "verified"


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
