"""Environments for multi-turn rollouts (`--env`): the API (api.py), plain functions as a
tool-calling environment (tools.py), the episode runner the online loop samples with
(episodes.py); and where a policy's code is carried out: the sandbox for model-written Python
(sandbox.py, with sandbox_boot.py, the code that runs first inside) and a reward that runs a
completion's code against its row's tests there (code_reward.py). docs/environments.md is the
user's guide."""

from tether.envs.api import Environment, EnvError, load_environments
from tether.envs.tools import ToolEnv, tool_env

__all__ = ["Environment", "EnvError", "ToolEnv", "load_environments", "tool_env"]
