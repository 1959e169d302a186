"""The published package's model paths (``dattri.benchmark.models.<family>``).

The models themselves live with their settings in ``dattri.benchmark.datasets``;
these modules re-export them under the published names so that code written for
the published package imports unchanged.
"""

SUPPORTED_MODELS = ["lr", "mlp", "resnet9", "resnet18", "musictransformer", "nanogpt", "gpt2"]

__all__ = ["SUPPORTED_MODELS"]
