"""GPT-2 (WikiText-2 setting), at its published path; needs ``transformers``."""

from dattri.benchmark.models.gpt2.gpt2 import create_gpt2_model

__all__ = ["create_gpt2_model"]
