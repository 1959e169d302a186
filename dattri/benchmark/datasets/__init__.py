"""Data, models and training recipes of the benchmark settings, one subpackage each.

``mnist`` (LR, MLP), ``cifar`` (ResNet-9 on CIFAR-2 / CIFAR-10), ``maestro``
(Music Transformer) and ``shakespeare_char`` (nanoGPT). Import the subpackage you
need, e.g. ``from dattri.benchmark.datasets.mnist import create_mnist_dataset``;
nothing is imported here so that each setting's optional dependencies stay
optional.
"""
