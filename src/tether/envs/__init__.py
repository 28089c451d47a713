"""Environments: where a policy's actions are carried out, for rewards and for tools.

sandbox: run model-written Python in a separate, limited process (docs/environments.md, "Sandbox").
code_reward: a reward function that runs a completion's code against its row's tests there.
"""
