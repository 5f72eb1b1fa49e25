"""Parallel strategies: each applies one kind of parallelism to a model at load, binding the ``Mesh`` into it.

Two shapes: model strategies bind the mesh into a model at load (``SequenceParallel(mesh).apply(model)``); row
strategies compute one denoising step's rows across ranks (``row_forward.RowForward``, picked per mesh by
``row_forward.row_forward_for``: CFG and pipeline parallelism).
"""

from omni_runtime.parallel.strategies.sequence_parallel import SequenceParallel

__all__ = ["SequenceParallel"]
