"""One online RL loop for every method that samples from the policy as it trains.

`tether ppo`, `tether grpo` and `tether rloo` all run `loop.run`: prompts, rollouts, reference
logprobs, rewards, KL, the clipped policy loss, minibatches, checkpoints, resume, health checks
and metrics are the same code. What differs is small and lives in pure functions:

| what | where |
|---|---|
| the loop: iterations, checkpoints, resume, metrics | `recipes/online/loop.py` |
| building the models, optimizers, sampler, rewards | `recipes/online/setup.py` |
| PPO's critic, GAE and value loss; the shared update step | `recipes/online/update.py`, `ops/advantages.py`, `losses/ppo.py` |
| the critic-free iteration (groups of G responses per prompt) | `recipes/online/critic_free.py` |
| GRPO / Dr. GRPO / RLOO / REINFORCE++ advantages, DAPO's length shaping | `ops/group_advantages.py` |
| the critic-free loss: aggregation modes, clip-higher, GSPO's sequence ratio, KL in the loss | `losses/policy_gradient.py` |
| prompts and PPO-ptx data | `recipes/online/data.py` |
| samples, evaluation, the final save | `recipes/online/outputs.py` |
| reward models and Python reward functions | `rollout/score.py`, `rollout/reward_fns.py` |
"""
