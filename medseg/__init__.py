"""Models, training, inference with Monte-Carlo uncertainty, synthetic studies, and the command line."""

__version__ = "0.1.0"
