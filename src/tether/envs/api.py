"""The environment API: what `--env path/to/file.py:Name` names.

An environment is a small Python class. The online loop makes one instance per episode, with
no arguments, and calls:

    reset(row) -> str | None
        row: the prompts file's row (every column, as reward functions get them). Returns the
        first observation, appended after the prompt before the policy's first turn, or None.
        (A reset(**columns), as TRL's environments have, gets the columns as keywords.)
    step(action) -> (observation, reward, done)       or (observation, reward, done, info)
        action: the text of the policy's turn (special tokens left out). observation: the text
        appended before the policy's next turn (str), a list of {role, content} messages (chat
        prompts), or None. reward: a float for this turn, or None. done: the episode is over.
        info (optional): a dict; `tool_calls` and `tool_errors` (ints) are counted in the
        metrics.

Optional class attributes:

    stop: tuple of strings     besides EOS, a policy turn ends right after any of them
    observation_role: str      with chat prompts, the role an observation string is sent as
                               ("user" by default; "tool" for tool results)
    tools: list of functions   with chat prompts, their JSON schemas go to the chat template
    close()                    called once the episode is over

That is gymnasium's `reset`/`step` with text for observations and actions (its five-item step,
(observation, reward, terminated, truncated, info), and its (observation, info) reset are taken
as they are), and TRL's environment factories adapt to it in a few lines (docs/environments.md).
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

from tether.data.preference import is_messages
from tether.errors import ConfigError, TrainingError


class Environment:
    """A base class for environments (inheriting from it is optional: any class with `reset`
    and `step` will do)."""

    stop: tuple[str, ...] = ()
    observation_role: str = "user"
    tools: Sequence[Callable[..., Any]] = ()

    def reset(self, row: dict) -> Optional[str]:
        return None

    def step(self, action: str) -> tuple:
        raise NotImplementedError

    def close(self) -> None:
        """Nothing to release."""


class EnvError(TrainingError):
    """An environment raised, hung or answered something that is not a step."""


@dataclass
class Step:
    """One checked answer of `step`."""

    observation: Optional[str | list[dict]]
    reward: Optional[float]
    done: bool
    info: dict = field(default_factory=dict)


@dataclass(frozen=True)
class EnvSpec:
    """A loaded --env: its name (for metrics and errors) and what makes an instance."""

    name: str
    factory: Callable[[], Any]

    def make(self) -> Any:
        env = self.factory()
        for method in ("reset", "step"):
            if not callable(getattr(env, method, None)):
                raise ConfigError(f"--env {self.name}: {type(env).__name__} has no {method}() method; "
                                  "an environment needs reset(row) and step(action) (docs/environments.md)")
        return env

    def attribute(self, name: str, default: Any) -> Any:
        """A class attribute of the environment, read without making an instance when it can."""
        return getattr(self.factory, name, default) if inspect.isclass(self.factory) else default


def load_environments(specs: Sequence[str]) -> list[EnvSpec]:
    """The environments named by --env (path/to/file.py:Name or package.module:Name): a class,
    or a function of no arguments that returns an environment."""
    from tether.specs import load_object

    out = []
    for spec in specs:
        obj = load_object(spec, "--env")
        if not callable(obj):
            raise ConfigError(f"--env {spec} names a {type(obj).__name__}; name a class (or a function "
                              "of no arguments) whose instances have reset(row) and step(action)")
        out.append(EnvSpec(spec.rpartition(":")[2] or spec, obj))
    return out


def call_reset(env: Any, row: dict) -> Any:
    """env.reset with the row as its signature takes it: reset(row), TRL's reset(**columns),
    or reset() when it takes nothing."""
    try:
        params = list(inspect.signature(env.reset).parameters.values())
    except (TypeError, ValueError):  # no signature to read: the documented form
        return env.reset(row)
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if positional or any(p.kind is p.VAR_POSITIONAL for p in params):
        return env.reset(row)
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return env.reset(**row)
    return env.reset()


def checked_step(value: Any, env: str, where: str) -> Step:
    """A `step` return value as a Step, or EnvError naming the environment and the row.
    gymnasium's five items (observation, reward, terminated, truncated, info) are taken too:
    done is terminated or truncated."""
    what = f"environment {env} on {where}"
    if not isinstance(value, tuple) or len(value) not in (3, 4, 5):
        raise EnvError(f"{what}: step() returned {value!r}; return (observation, reward, done) "
                       "or (observation, reward, done, info)")
    if len(value) == 5:
        observation, reward, terminated, truncated, info = value
        value = (observation, reward, bool(terminated) or bool(truncated), info)
    observation, reward, done = value[:3]
    info = value[3] if len(value) == 4 else {}
    if observation is not None and not isinstance(observation, str) and not _messages(observation):
        raise EnvError(f"{what}: step() returned the observation {observation!r}; give a str, a "
                       "list of {role, content} messages, or None")
    if reward is not None:
        if isinstance(reward, bool) or not isinstance(reward, (int, float)) and not hasattr(reward, "__float__"):
            raise EnvError(f"{what}: step() returned the reward {reward!r}; give a float or None")
        reward = float(reward)
        if not math.isfinite(reward):
            raise EnvError(f"{what}: step() returned the reward {reward}; rewards must be finite")
    if not isinstance(done, (bool, int)) and type(done).__name__ != "bool_":
        raise EnvError(f"{what}: step() returned done={done!r}; give True or False")
    if not isinstance(info, dict):
        raise EnvError(f"{what}: step() returned info {info!r}; give a dict")
    return Step(observation, reward, bool(done), info)


def checked_reset(value: Any, env: str, where: str) -> Optional[str | list[dict]]:
    """A `reset` return value: the first observation, or None (gymnasium's (observation, info)
    is taken too)."""
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], dict):
        value = value[0]
    if value is not None and not isinstance(value, str) and not _messages(value):
        raise EnvError(f"environment {env} on {where}: reset() returned {value!r}; give the first "
                       "observation as a str (or messages), or None")
    return value


def _messages(value: Any) -> bool:
    """Messages (`data.preference.is_messages`), or none at all ([])."""
    return value == [] or is_messages(value)
