"""Benchmark suite of the paper (Sec. 4, Table 3): settings, data, models, metrics.

Submodules are imported on demand so that ``import dattri.benchmark`` stays
light:

* ``dattri.benchmark.utils``: ``SubsetSampler``, ``flip_label`` and the shared
  training / loss helpers.
* ``dattri.benchmark.datasets.mnist``: MNIST-10 with logistic regression and MLP.
* ``dattri.benchmark.datasets.cifar``: CIFAR-2 / CIFAR-10 with ResNet-9 (offline
  stand-in: Fashion-MNIST).
* ``dattri.benchmark.datasets.maestro`` and ``.shakespeare_char``: the generative
  settings.

Every dataset function takes ``path=`` for the original data set on disk and
falls back to an offline copy of real data installable from a package registry.
"""
