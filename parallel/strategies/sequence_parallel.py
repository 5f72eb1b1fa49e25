"""``SequenceParallel``: shard a model's sequence over the mesh's sp group, at load.

``SequenceParallel(mesh).apply(model)``

* binds the mesh's sp / ulysses / ring groups into every :class:`~parallel.attention.Attention` layer of the model
  that takes sequence shards (the diffusers processor pattern: the layer holds its parallel state, nothing is
  looked up per call);
* installs the hooks of the model's ``_sp_plan`` (:func:`parallel.sp_hooks.apply_sequence_parallel`), which split
  the inputs over the sp group and gather the output.

With an sp group of one rank it changes nothing. :meth:`SequenceParallel.remove` undoes both.
"""

from __future__ import annotations

import logging
from typing import Any

from torch import nn

from omni_runtime.parallel.attention import Attention, SPMesh
from omni_runtime.parallel.sp_hooks import apply_sequence_parallel, remove_sequence_parallel
from omni_runtime.parallel.sp_plan import SequenceParallelModelPlan

logger = logging.getLogger(__name__)


class SequenceParallel:
    """Sequence parallelism (Ulysses, Ring or both, as the mesh's degrees say) for one model.

    ``convert_to_fp32``: Ring attention merges partial outputs in float32 (True) or in the input dtype.
    ``plan``: the ``_sp_plan`` to apply (default: the model's own). ``check_gathers``: raise after a forward that
    sharded inputs but gathered nothing.
    """

    def __init__(self, mesh: Any, *, convert_to_fp32: bool = True, plan: SequenceParallelModelPlan | None = None,
                 check_gathers: bool = True) -> None:
        self.mesh = mesh
        self.sp_mesh = SPMesh.from_mesh(mesh, convert_to_fp32=convert_to_fp32)
        self.plan = plan
        self.check_gathers = check_gathers

    @property
    def size(self) -> int:
        """The sequence-parallel degree (ulysses × ring)."""
        return self.mesh.size("sp")

    def apply(self, model: nn.Module) -> nn.Module:
        """Bind the mesh into the model's attention layers and install the ``_sp_plan`` hooks; returns the model."""
        if self.size == 1:
            return model
        apply_sequence_parallel(model, self.mesh.group("sp"), self.plan, check_gathers=self.check_gathers)
        layers = [m for m in model.modules() if isinstance(m, Attention)]
        for layer in layers:
            layer.bind_mesh(self.sp_mesh)
        logger.info("sequence parallel (%s) over %d ranks: %d attention layers bound", self.sp_mesh.strategy,
                    self.size, sum(layer.sp_mesh is not None for layer in layers))
        return model

    def remove(self, model: nn.Module) -> nn.Module:
        """Undo :meth:`apply`: the model is single-rank again."""
        remove_sequence_parallel(model)
        for layer in model.modules():
            if isinstance(layer, Attention):
                layer.bind_mesh(None)
        return model
