"""Test-time dropout for dropout ensembles (Deng et al. 2024).

"Efficient Ensembles Improve Training Data Attribution" replaces an ensemble of
independently trained models by one trained model evaluated under several dropout
masks: each ensemble member is the same weights with dropout kept active at
attribution time, and the attribution scores are averaged over the masks.
:func:`activate_dropout` prepares a model for this.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from dattri.errors import DattriValueError, LayerNameError

__all__ = ["activate_dropout", "active_dropout"]

_DropoutBase = nn.modules.dropout._DropoutNd  # Dropout, Dropout1d/2d/3d, AlphaDropout...


def active_dropout(model: nn.Module) -> list[str]:
    """Names of the model's dropout layers that draw random masks now (training mode,
    ``p > 0``): the members of a dropout ensemble differ in them."""
    return [name for name, m in model.named_modules()
            if isinstance(m, _DropoutBase) and m.training and m.p > 0]


def activate_dropout(
    model: nn.Module,
    layer_positions: Sequence[str] | str | None = None,
    dropout_prob: float = 0.1,
) -> nn.Module:
    """Put the model in eval mode except for its dropout layers, which stay random.

    The whole model is first switched to ``eval()`` (batch norm uses running
    statistics); then the selected dropout modules get ``p = dropout_prob`` and are
    switched to ``train()``, so every forward pass draws a fresh mask. Each call of
    the model is then one member of a dropout ensemble (Deng et al. 2024): with
    ``torch.manual_seed(m)`` before evaluating member ``m``, members are
    reproducible.

    Args:
        model: the model; modified in place.
        layer_positions: names of dropout modules as in ``model.named_modules()``
            (exact names; a single string means one name). ``None`` or empty: every
            dropout module (``nn.Dropout``, ``nn.Dropout1d/2d/3d``, ``nn.AlphaDropout``,
            ...).
        dropout_prob: the dropout probability, in ``[0, 1)``.

    Returns:
        The same ``model``.

    Raises:
        LayerNameError: a name is not a dropout module of the model (the message
            lists the dropout module names it has).
        DattriValueError: ``dropout_prob`` is outside ``[0, 1)``, or the model has no
            dropout module.
    """
    if isinstance(dropout_prob, bool) or not isinstance(dropout_prob, (int, float)) or not (
        0.0 <= dropout_prob < 1.0
    ):
        msg = f"dropout_prob must be a float in [0, 1), got {dropout_prob!r}; e.g. dropout_prob=0.1"
        raise DattriValueError(msg)
    dropouts = {name: m for name, m in model.named_modules() if isinstance(m, _DropoutBase)}
    if not dropouts:
        msg = (
            f"{type(model).__name__} has no dropout module, so a dropout ensemble would "
            "repeat the same model; add nn.Dropout layers (or use independently trained "
            "checkpoints)"
        )
        raise DattriValueError(msg)
    if isinstance(layer_positions, str):
        layer_positions = [layer_positions]
    names = list(layer_positions) if layer_positions else list(dropouts)
    unknown = [n for n in names if n not in dropouts]
    if unknown:
        msg = (
            f"layer_positions {unknown} are not dropout modules of the model; "
            f"its dropout modules are {list(dropouts)}"
        )
        raise LayerNameError(msg)
    model.eval()
    for name in names:
        dropouts[name].p = float(dropout_prob)
        dropouts[name].train()
    return model
