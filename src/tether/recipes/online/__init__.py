"""One online RL loop for every method that samples from the policy as it trains.

`tether ppo`, `grpo`, `rloo` and `online-dpo` all run `loop.run`: prompts, rollouts, reference
logprobs, rewards, KL, minibatches, checkpoints, resume, health checks and metrics are the same
code. A method is one `Algorithm` (algorithm.py) in a module of its own; its math lives in pure
functions in `ops/` and `losses/`:

| what | where |
|---|---|
| the loop: iterations, checkpoints, resume, metrics | `loop.py` |
| the hooks a method implements | `algorithm.py` |
| the steps every method shares (sample, score, pi_old, KL control, health) | `steps.py` |
| PPO: critic, per-token rewards, GAE, clipped policy + value loss | `ppo.py` |
| GRPO, Dr. GRPO, RLOO, REINFORCE++ (groups of G responses), DAPO's shaping | `group.py` |
| online DPO: pairs labelled by an RM, a function or an LM judge | `online_dpo.py` |
| building the models, optimizers, sampler, rewards (`OnlineParts`) | `setup.py` |
| the update: minibatches, micro-batches, PPO-ptx, optimizer steps | `update.py` |
| prompts and PPO-ptx data | `data.py` |
| samples, evaluation, the final save | `outputs.py` |
| reward models and Python reward functions | `rollout/score.py`, `rollout/reward_fns.py` |
"""
