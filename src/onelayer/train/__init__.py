"""Training: the RL loop, evaluation, warm start of built-in models and checkpoints."""

from onelayer.train.loop import run
from onelayer.train.update import TrainingError

__all__ = ["TrainingError", "run"]
