"""Plain Python functions as a tool-calling environment (`ToolEnv`, `tool_env`).

The policy calls a tool by writing, anywhere in its turn, one block per call:

    <tool_call>
    {"name": "add", "arguments": {"a": 2, "b": 3}}
    </tool_call>

That is the format of the chat templates that have a tools section (Qwen2, Qwen2.5, Qwen3,
Hermes and others): with chat prompts and such a template, the tools' JSON schemas (from the
functions' type hints and docstrings, `transformers.utils.get_json_schema`) go into the
prompt through the template, and each result comes back as a message of role "tool". With a
template without a tools section, `describe_tools`'s text goes first as a system message (the
results are still "tool" messages); with plain prompts that text goes before the prompt, and
each result is appended as

    <tool_response>
    5
    </tool_response>

A turn without a tool call is the final answer and ends the episode (its reward comes from
the reward functions or the reward model, or from `ToolEnv.reward` when a subclass defines it).
A call to an unknown tool, with arguments that do not fit, or that raises, answers with an
error message the policy can read; it is counted as a tool error, and the episode goes on.
"""

from __future__ import annotations

import json
import re
from typing import Any, Callable, Optional, Sequence

from tether.envs.api import Environment

CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


def tool_schema(fn: Callable[..., Any]) -> dict:
    """The JSON schema chat templates take for one function (its type hints and its docstring's
    Args section give the parameters)."""
    from transformers.utils import get_json_schema

    return get_json_schema(fn)


def describe_tools(schemas: Sequence[dict]) -> str:
    """The plain-text format: the tools (their JSON schemas) and how to call them, for prompts
    that are not rendered by a chat template with a tools section."""
    lines = ["You can call these tools:"]
    lines += [json.dumps(schema.get("function", schema)) for schema in schemas]
    lines.append('To call one, write <tool_call>{"name": ..., "arguments": {...}}</tool_call>; '
                 "its result comes back in <tool_response></tool_response>. Answer without a tool "
                 "call when you are done.")
    return "\n".join(lines) + "\n"


def parse_calls(text: str) -> list[tuple[Optional[dict], str]]:
    """Each <tool_call> block of a turn: (the parsed call, or None when it is not a JSON object
    with a name, and the block's text)."""
    out = []
    for match in CALL.finditer(text):
        body = match.group(1)
        try:
            call = json.loads(body)
        except json.JSONDecodeError:
            call = None
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            call = None
        out.append((call, body))
    return out


class ToolEnv(Environment):
    """An environment whose actions are tool calls. Subclass it and set `tools`, or make one
    with `tool_env([...])`; set `max_tool_calls` to bound the calls per episode."""

    observation_role = "tool"
    stop = ("</tool_call>",)
    max_tool_calls = 16

    def __init__(self) -> None:
        self.row: dict = {}
        self.calls = 0
        self._by_name = {fn.__name__: fn for fn in self.tools}

    def reset(self, row: dict) -> Optional[str]:
        self.row = row
        return None

    def reward(self, answer: str) -> Optional[float]:
        """The reward of the final answer, for a subclass that knows it; None: left to the
        reward functions or the reward model."""
        return None

    def step(self, action: str) -> tuple:
        calls = parse_calls(action)
        if not calls:
            return None, self.reward(action), True, {"tool_calls": 0, "tool_errors": 0}
        results, errors = [], 0
        for call, body in calls:
            self.calls += 1
            if self.calls > self.max_tool_calls:
                results.append(f"error: more than {self.max_tool_calls} tool calls in this episode")
                errors += 1
                continue
            text, failed = self.call(call, body)
            results.append(text)
            errors += failed
        messages = [{"role": "tool", "content": r} for r in results]
        return messages, None, False, {"tool_calls": len(calls), "tool_errors": errors}

    def call(self, call: Optional[dict], body: str) -> tuple[str, bool]:
        """(result text, whether it failed) of one call."""
        if call is None:
            return f"error: {body[:200]!r} is not a JSON object with a name and arguments", True
        fn = self._by_name.get(call["name"])
        if fn is None:
            return f"error: no tool named {call['name']!r}; the tools are {', '.join(self._by_name)}", True
        arguments = call.get("arguments", {})
        if isinstance(arguments, str):  # some templates write the arguments as a JSON string
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                return f"error: the arguments {arguments[:200]!r} are not a JSON object", True
        if not isinstance(arguments, dict):
            return f"error: the arguments must be a JSON object, not {arguments!r}", True
        try:
            result = fn(**arguments)
        except TypeError as err:
            return f"error: {call['name']}: {err}", True
        except Exception as err:  # the tool's own failure is an answer the policy can read
            return f"error: {type(err).__name__}: {err}", True
        return (result if isinstance(result, str) else json.dumps(result, default=str)), False


def tool_env(tools: Sequence[Callable[..., Any]], name: str = "Tools",
             max_tool_calls: int = 16) -> type[ToolEnv]:
    """A ToolEnv class with these tools, for `--env file.py:Name`:

        Calculator = tool_env([add, multiply])
    """
    return type(name, (ToolEnv,), {"tools": tuple(tools), "max_tool_calls": max_tool_calls})
