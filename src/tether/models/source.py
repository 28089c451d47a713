"""Is a model option a local directory, and if not, can the hub answer for it? Checked for every
model option of a stage before the stage starts, so that a mistyped path is named at once
instead of after transformers has spent most of a minute retrying a hub it cannot reach.

A value that is an existing directory passes. A value that can only be a path (`./x`, `a/b/c`,
`x.jsonl`, ...) and does not exist is an error. Any other value could be a hub id (`gpt2`,
`owner/name`): it passes only when the hub can answer, i.e. HF_HUB_OFFLINE is not set and the
hub's host accepts a connection within HUB_TIMEOUT seconds (name resolution included); else it
is an error that names the directory first and the hub second.
"""

from __future__ import annotations

import os
import socket
import threading
from dataclasses import fields
from pathlib import Path
from typing import Any, Optional
from urllib.parse import urlparse

from tether.errors import ConfigError

HUB_TIMEOUT = 3.0  # seconds to wait for the hub's host, DNS included
# Config fields that name a model (directory or hub id), with what else they may hold
MODEL_OPTIONS = {"model": (), "policy": (), "reference": (), "reward_model": (), "judge": ("world",),
                 "policy_a": ("file",), "policy_b": ("file",)}
_TRUE = {"1", "true", "yes", "on"}
_hub_verdict: dict[str, Optional[str]] = {}


def hub_unreachable() -> Optional[str]:
    """None when the hub can answer, else why not ('offline: HF_HUB_OFFLINE is set', ...).
    Decided once per process."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE:
        return "offline (HF_HUB_OFFLINE is set)"
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    if endpoint not in _hub_verdict:
        _hub_verdict[endpoint] = _probe(endpoint)
    return _hub_verdict[endpoint]


def _probe(endpoint: str) -> Optional[str]:
    url = urlparse(endpoint)
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    outcome: list[Optional[str]] = []

    def connect() -> None:  # in a thread: getaddrinfo has no timeout of its own
        try:
            socket.create_connection((host, port), timeout=HUB_TIMEOUT).close()
            outcome.append(None)
        except OSError as err:
            outcome.append(f"offline ({host} cannot be reached: {err.strerror or err})")

    worker = threading.Thread(target=connect, daemon=True)
    worker.start()
    worker.join(HUB_TIMEOUT + 0.5)
    return outcome[0] if outcome else f"offline ({host} did not answer within {HUB_TIMEOUT:.0f} s)"


def check_model_source(flag: str, value: str, allow: tuple[str, ...] = ()) -> None:
    """ConfigError unless `value` is a model directory, or a hub id the hub can answer for.
    allow: "world" (a built-in name) and/or "file" (a JSONL of responses may stand in)."""
    if not value or value in allow:
        return
    path = Path(value).expanduser()
    if path.is_dir() or ("file" in allow and path.is_file()):
        return
    if path.exists():
        raise ConfigError(f"{flag} {value} is a file; give the model's directory")
    from tether.data.io import looks_like_path

    missing = f"{flag}: no such directory {value!r} (relative to {Path.cwd()})"
    if looks_like_path(value):
        raise ConfigError(f"{missing}; a hub id would read name or owner/name")
    reason = hub_unreachable()
    if reason is not None:
        raise ConfigError(f"{missing}, and it could not be looked up as a hub id: {reason}")


def check_model_sources(cfg: Any) -> None:
    """Every model option of a stage's config (`MODEL_OPTIONS`), in the order of its fields."""
    for f in fields(cfg):
        if f.name in MODEL_OPTIONS and isinstance(getattr(cfg, f.name), str):
            check_model_source("--" + f.name.replace("_", "-"), getattr(cfg, f.name), MODEL_OPTIONS[f.name])
