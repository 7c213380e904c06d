"""Readers for data sets in their release formats, each returning uint8 NCHW arrays + labels."""

from bitrain.datasets.cache import default_data_dir
from bitrain.datasets.cifar import load_cifar
from bitrain.datasets.mnist import load_mnist

__all__ = ["default_data_dir", "load_cifar", "load_mnist"]
