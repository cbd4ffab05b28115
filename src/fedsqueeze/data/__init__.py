"""Datasets and partitioners."""

from fedsqueeze.data.partition import dirichlet_partition, iid_partition, partition
from fedsqueeze.data.sources import RawDataset, RawSplit, load_dataset

__all__ = ["RawDataset", "RawSplit", "dirichlet_partition", "iid_partition", "load_dataset", "partition"]
