"""Parallel strategies: each applies one kind of parallelism to a model at load, binding the ``Mesh`` into it.

``SequenceParallel`` today; CFG, pipeline, HSDP and expert parallelism follow the same shape
(``Strategy(mesh).apply(model) -> model``).
"""

from omni_runtime.parallel.strategies.sequence_parallel import SequenceParallel

__all__ = ["SequenceParallel"]
