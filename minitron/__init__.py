"""minitron: turn one large language model into smaller ones by pruning and distillation."""

__version__ = "0.1.0"
