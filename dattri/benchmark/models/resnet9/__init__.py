"""ResNet-9, at its published path."""
