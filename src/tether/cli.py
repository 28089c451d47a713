"""`tether <stage> [--config FILE.yaml] [--option value ...]`.

The CLI is thin: it looks the stage name up in the stage registry (`tether.stages`) for its
config dataclass and its recipe, builds and validates the config (YAML, then flags), and calls
the recipe on it. Recipes are imported lazily, so `tether --help` stays fast.
"""

from __future__ import annotations

import os
import sys
from typing import Optional

from tether.errors import Interrupted, TetherError
from tether.stages import STAGES, config_class, run_stage


def _usage() -> str:
    width = max(len(n) for n in STAGES)
    lines = ["usage: tether <stage> [--config FILE.yaml] [--option value ...]", "",
             "tether runs the RLHF pipeline (SFT -> reward model -> PPO with a KL tether to the SFT",
             "model, plus DPO and best-of-N) on any Hugging Face causal LM.", "", "stages:"]
    lines += [f"  {name.ljust(width)}  {stage.summary}" for name, stage in STAGES.items()]
    lines += ["", "Run `tether <stage> --help` for every option of a stage."]
    return "\n".join(lines)


def _match_stage(argv: list[str]) -> tuple[Optional[str], list[str]]:
    """Longest stage name (stages may be two words, e.g. `world export`) that prefixes argv."""
    for n_words in (2, 1):
        name = " ".join(argv[:n_words])
        if len(argv) >= n_words and name in STAGES:
            return name, argv[n_words:]
    return None, argv


def main(argv: Optional[list[str]] = None) -> int:
    grouped, closed = _process_group_up(), False
    try:
        code = _main(list(sys.argv[1:] if argv is None else argv))
        sys.stdout.flush()  # inside the try: a closed pipe surfaces here, not at exit
    except BrokenPipeError:  # `tether ppo --help | head`: the reader left, which is not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        code = 0
    finally:
        if not grouped and _process_group_up():
            _close_process_group()
            closed = True
    if closed and argv is None:  # the program itself, one process of a launch
        _exit_now(code)
    return code


def _process_group_up() -> bool:
    dist = sys.modules.get("torch.distributed")  # never import torch only for this
    return dist is not None and dist.is_available() and dist.is_initialized()


def _close_process_group() -> None:
    """Wait for every process, then destroy the process group this run started (under a
    launcher), before the interpreter exits. Without this, a process that had finished its work
    sometimes aborted at exit ('terminate called without an active exception', SIGABRT) while
    the main process was still writing, and the launcher reported a failed run: the 2-process
    bon/eval test's launches did so in 6 of 31 runs (destroying the group without the barrier
    did not stop it); with the barrier, 18 of 18 passed. A group the caller had already set up
    is left to the caller."""
    import torch.distributed as dist

    try:
        dist.barrier()  # every process has finished (the main one writes last) before any tears down
    finally:
        dist.destroy_process_group()


def _exit_now(code: int) -> None:
    """End a launched process once its work is written and its process group destroyed, without
    the interpreter's teardown. Even after the barrier and the group's destruction, a process
    sometimes still aborted in that teardown ('terminate called without an active exception',
    C++'s std::terminate at exit, as when a joinable thread is destroyed), and the launcher
    called the finished run failed (1 of the 2-process launches of a full CI run, 2026-12-03).
    Output streams and log handlers are flushed first; every file the run writes is closed by
    then."""
    import logging

    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    logging.shutdown()
    os._exit(code)


def _main(argv: list[str]) -> int:
    if not argv or argv[0] in {"-h", "--help", "help"}:
        print(_usage())
        return 0
    if argv[0] in {"-V", "--version"}:
        from tether import __version__

        print(f"tether {__version__}")
        return 0
    name, rest = _match_stage(argv)
    if name is None:
        print(f"tether: unknown stage {argv[0]!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    stage = STAGES[name]
    if stage.positional and rest and not rest[0].startswith("-"):
        rest = ["--" + stage.positional, rest[0], *rest[1:]]
    config_cls = config_class(name)
    if any(a in {"-h", "--help"} for a in rest):
        from tether.config import config_help

        print(config_help(config_cls, f"tether {name}"))
        return 0
    try:
        from tether.config import load_config

        cfg = load_config(config_cls, rest)
        run_stage(name, cfg)
    except TetherError as err:
        from tether.training.rundir import abandon_failed_starts

        if not isinstance(err, Interrupted):
            abandon_failed_starts()
        print(f"tether {name}: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print(f"tether {name}: aborted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
