"""Run infrastructure every step shares: configs and their flags, the process group, DeepSpeed engines, the
training loop, checkpoints and resume, guards (signals, non-finite updates), metrics."""
