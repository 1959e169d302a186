"""dattri: efficient training-data attribution for PyTorch."""

__version__ = "0.1.0"
