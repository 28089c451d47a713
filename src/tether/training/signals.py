"""Turn SIGINT/SIGTERM into a flag the training loop checks between steps.

The loop finishes the step in flight, saves a checkpoint and exits cleanly instead of dying
mid-write. A second Ctrl-C restores the default behaviour (immediate KeyboardInterrupt).
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Optional


class StopRequest:
    """Context manager: `.requested` turns True once SIGINT or SIGTERM arrives."""

    def __init__(self) -> None:
        self.requested = False
        self.signal_name: Optional[str] = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: Optional[FrameType]) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        self.signal_name = signal.Signals(signum).name
        print(f"\n[tether] {self.signal_name} received: finishing this step, saving a checkpoint,"
              " then exiting. Press Ctrl-C again to abort without saving.", flush=True)

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
