"""An InstructGPT-style RLHF pipeline (SFT, reward model, PPO) on DeepSpeed and the hybrid engine.

Modules: ``rlhf.data`` (formats, splits, tokenization, synthetic task), ``rlhf.models`` (actor, reward
model, critic), ``rlhf.losses`` (pure loss functions), ``rlhf.sft`` / ``rlhf.reward`` / ``rlhf.ppo``
(the three steps), ``rlhf.train`` (the ``rlhf train`` command).
"""

__version__ = "0.1.0"
