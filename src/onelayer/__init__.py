"""onelayer: RL post-training of language models that updates only chosen transformer layers."""

__version__ = "0.1.0"
