"""Training: the RL loop, evaluation, warm start of built-in models and checkpoints."""

from onelayer.train.loop import TrainingError, run

__all__ = ["TrainingError", "run"]
