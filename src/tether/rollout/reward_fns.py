"""Rewards given as Python functions (verifiable rewards: exact answers, format checks, tests).

A function is named `path/to/file.py:name` (or `package.module:name`) and has TRL's signature:

    def score(prompts: list[str], completions: list[str], **columns) -> list[float | None]

`columns` holds every other column of the prompts file, one list per column, aligned with the
prompts (for example `answer`). None means "not applicable to this row". With several
functions, a row's reward is the weighted sum of the values that apply (`--reward-weights`,
1.0 each by default). A learned reward model's score, when there is one, is added to that sum;
a row to which no function applies then gets the reward model's score alone. Without a reward
model, such a row has no reward at all, which is an error.

Plain prompts and completions are strings. As in TRL, a batch of conversational prompts
(`messages` rows) comes as the messages themselves, each a list of {"role", "content"} dicts,
and each completion as a one-message list, [{"role": "assistant", "content": text}]. Each
function gets its own copy of both. Also as in TRL, a function that takes them (by name, or
through **kwargs) gets `completion_ids`, each completion's token ids (its EOS included when it
has one), and `trainer_state`, a transformers TrainerState whose `global_step` counts the
iterations (rollouts and their update) done before this one; and an `async def` function is
awaited.

A function that raises, returns the wrong number of values, or returns something that is not
a finite number (or None) stops the run with an error naming the function and the row; the last
checkpoint is untouched, since this happens before the iteration's update.
"""

from __future__ import annotations

import copy
import inspect
import math
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

from tether.errors import ConfigError, TrainingError
from tether.specs import load_object


def load_reward_fn(spec: str) -> Callable[..., Any]:
    """The function named by `path/to/file.py:name` or `package.module:name` (tether.specs)."""
    return load_object(spec, "--reward-fn")


def checked_values(values: Any, n: int, what: str, where: Sequence[str],
                   error: type = TrainingError) -> list[Optional[float]]:
    """A reward function's return value as n floats or None (TRL's contract), else `error`
    naming the function (`what`) and the row (`where[i]` names the i-th completion's)."""
    try:
        values = list(values)
    except TypeError:
        raise error(f"{what} returned {type(values).__name__}, not a list of {n} floats (or None)") from None
    if len(values) != n:
        raise error(f"{what} returned {len(values)} value(s) for {n} completions; it must return "
                    "one per completion")
    out: list[Optional[float]] = []
    for i, v in enumerate(values):
        if v is None:
            out.append(None)
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)) and not hasattr(v, "__float__"):
            raise error(f"{what} returned {v!r} for {where[i]}: give a float, or None where it does "
                        "not apply")
        v = float(v)
        if not math.isfinite(v):
            raise error(f"{what} returned {v} for {where[i]}: scores must be finite")
        out.append(v)
    return out


@dataclass
class RewardFunctions:
    """The weighted reward functions of a run."""

    specs: list[str]
    functions: list[Callable[..., Any]]
    weights: list[float]

    @classmethod
    def from_config(cls, specs: Sequence[str], weights: Sequence[float]) -> "RewardFunctions":
        if weights and len(weights) != len(specs):
            raise ConfigError(f"--reward-weights gives {len(weights)} weight(s) for "
                              f"{len(specs)} --reward-fn function(s); give one per function")
        return cls(list(specs), [load_reward_fn(s) for s in specs],
                   [float(w) for w in weights] if weights else [1.0] * len(specs))

    @property
    def names(self) -> list[str]:
        """A short, unique metric name per function (its function name, numbered if repeated)."""
        out: list[str] = []
        for spec in self.specs:
            base = spec.rpartition(":")[2]
            name, k = base, 2
            while name in out:
                name, k = f"{base}_{k}", k + 1
            out.append(name)
        return out

    def __call__(self, prompts: Sequence[str], completions: Sequence[str], columns: dict[str, list],
                 rows: Sequence[str], scored_elsewhere: bool = False,
                 chats: Optional[Sequence[Optional[list[dict]]]] = None,
                 extras: Optional[dict[str, Any]] = None) -> tuple[list[float], dict[str, list]]:
        """(the weighted total per row, each function's raw values by name). `rows` names each
        row for error messages (e.g. prompts.jsonl:12). scored_elsewhere: every row also has a
        reward model's score, so a row no function applies to adds 0 to it rather than being an
        error. chats: each prompt's messages (None for a plain prompt); when every prompt has
        them, the functions get the conversational form (see the module docstring). extras:
        keywords (completion_ids, trainer_state) for the functions that take them."""
        n, per_fn = len(prompts), {}
        total = [0.0] * n
        applies = [False] * n
        given = conversational(prompts, completions, chats)
        for spec, name, fn, weight in zip(self.specs, self.names, self.functions, self.weights):
            try:  # copies: a function that changes its arguments cannot change the next one's
                values = fn(*copy.deepcopy(given), **{k: list(v) for k, v in columns.items()},
                            **copy.deepcopy(taken_by(fn, extras or {}, exclude=columns)))
                if inspect.isawaitable(values):
                    values = awaited(values)
            except Exception as err:
                raise TrainingError(f"reward function {spec} raised {type(err).__name__}: {err} "
                                    f"(on the batch of rows {rows[0]} ... {rows[-1]})") from None
            where = [f"{row} (completion {c[:80]!r})" for row, c in zip(rows, completions)]
            values = checked_values(values, n, f"reward function {spec}", where, TrainingError)
            for i, v in enumerate(values):
                if v is not None:
                    total[i] += weight * v
                    applies[i] = True
            per_fn[name] = values
        missing = [rows[i] for i in range(n) if not applies[i]]
        if missing and not scored_elsewhere:
            raise TrainingError(f"no reward function applies to {missing[0]} (each returned None)"
                                + (f" and {len(missing) - 1} other row(s)" if len(missing) > 1 else ""))
        return total, per_fn


def conversational(prompts: Sequence[str], completions: Sequence[str],
                   chats: Optional[Sequence[Optional[list[dict]]]]) -> tuple[list, list]:
    """(prompts, completions) as the functions get them: the texts, or TRL's conversational form
    when every prompt has its messages."""
    if not chats or any(c is None for c in chats):
        return list(prompts), list(completions)
    return [list(c) for c in chats], [[{"role": "assistant", "content": t}] for t in completions]


def taken_by(fn: Callable[..., Any], keywords: dict[str, Any], exclude: Any = ()) -> dict[str, Any]:
    """The `keywords` that `fn` takes (all of them when it has **kwargs), leaving out those
    named in `exclude` (a data column of the same name wins)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # a callable without a signature: only what it surely takes
        return {}
    open_ended = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    return {k: v for k, v in keywords.items() if (open_ended or k in params) and k not in exclude}


def awaited(awaitable: Any) -> Any:
    """The result of an `async def` reward function's coroutine, also when an event loop is
    already running in this thread (a notebook): then it runs on a thread of its own."""
    import asyncio

    async def wait() -> Any:
        return await awaitable

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(wait())
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, wait()).result()


def trl_trainer_state(iteration: int, max_steps: int) -> Any:
    """What TRL passes a reward function as `trainer_state` at iteration `iteration` (1-based):
    a transformers TrainerState whose global_step is the number of iterations done before it
    (TRL's count of optimizer steps, when each batch gets one, as by default)."""
    from transformers import TrainerState

    return TrainerState(global_step=iteration - 1, max_steps=max_steps)


def function_metrics(per_fn: dict[str, list]) -> dict[str, float]:
    """reward_fn/<name>/mean and /std over the rows a function applies to, and the share of
    rows it applies to."""
    out = {}
    for name, values in per_fn.items():
        got = [v for v in values if v is not None]
        mean = sum(got) / len(got) if got else 0.0
        var = sum((v - mean) ** 2 for v in got) / (len(got) - 1) if len(got) > 1 else 0.0
        out[f"reward_fn/{name}/mean"] = mean
        out[f"reward_fn/{name}/std"] = math.sqrt(var)
        out[f"reward_fn/{name}/applied"] = len(got) / max(len(values), 1)
    return out
