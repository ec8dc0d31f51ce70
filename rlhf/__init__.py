"""An InstructGPT-style RLHF pipeline (SFT, reward model, then PPO or a critic-free algorithm, or DPO) on DeepSpeed
and the hybrid engine.

Sub-packages by role: ``rlhf.data`` (formats, splits, tokenization, synthetic task), ``rlhf.core`` (estimators,
losses, experience, reward functions, the algorithm registry), ``rlhf.steps`` (SFT, reward model, DPO, the step-3
trainer), ``rlhf.runtime`` (configs and flags, process group, DeepSpeed engines, the training loop, checkpoints,
resume, guards, metrics), ``rlhf.cli`` (``rlhf train``, ``rlhf chat``, presets); ``rlhf.models`` builds and loads
the actor, reward model and critic.
"""

__version__ = "0.1.0"
