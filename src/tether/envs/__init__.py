"""Environments for multi-turn rollouts (`--env`): the API (api.py), tools as an environment
(tools.py), the episode runner the online loop samples with (episodes.py), and a sandbox for
model-written code (sandbox.py). docs/environments.md is the user's guide."""

from tether.envs.api import Environment, EnvError, load_environments
from tether.envs.tools import ToolEnv, tool_env

__all__ = ["Environment", "EnvError", "ToolEnv", "load_environments", "tool_env"]
