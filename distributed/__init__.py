"""Tensor-parallel communication: one ``TPGroup`` object that the model's layers call for their
all-reduces and all-gathers (no module-global state). Built by a worker after
``torch.distributed`` is initialised; ``TPGroup.single()`` is the one-rank no-op group."""
from distributed.tp import SmallAllReduce, TPGroup

__all__ = ["TPGroup", "SmallAllReduce"]
