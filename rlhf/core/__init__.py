"""The RL core: advantage estimators, policy and value losses, experience (rollouts as tensors), reward
functions, the algorithm registry. Pure tensors in, tensors out; no run infrastructure."""
