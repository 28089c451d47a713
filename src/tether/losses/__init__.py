"""Losses as pure functions returning (loss, stats): sft, reward, ppo, dpo.

Submodules are not imported here so that importing one loss does not import the others.
"""
