"""Music Transformer, at its published module path."""

from dattri.benchmark.datasets.maestro.model import MusicTransformer, create_musictransformer_model

__all__ = ["MusicTransformer", "create_musictransformer_model"]
