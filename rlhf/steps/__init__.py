"""The training steps: SFT, reward model, DPO and the step-3 RL trainer (every algorithm); each a config and a
``run_*`` function, runnable alone with ``python -m rlhf.steps.<name>``."""
