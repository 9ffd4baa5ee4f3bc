"""Subcommands of ``medseg``; each module has ``register(subparsers)`` and a ``run(args)``."""
