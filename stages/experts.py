"""Which transformer denoises each step: a family's expert schedule.

A checkpoint may hold more than one transformer ("experts"), each denoising a range of timesteps: Wan 2.2's
``WanPipeline`` with ``transformer_2`` and ``boundary_ratio`` runs ``transformer`` while the step's timestep ``t``
is ``>= boundary_ratio x num_train_timesteps`` and ``transformer_2`` below it, each with its own guidance scale
(``guidance_scale`` / ``guidance_scale_2``). The family declares the schedule
(:meth:`stages.models.family.ModelFamily.expert_schedule`); the denoiser loads every expert the same way (one
layout, the same sharding and hooks) and the running set runs each step's rows on the expert of their own step,
one forward per expert (``stages.step_batch``). Engines never look at the family's name.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ONE_EXPERT", "ExpertSchedule"]


@dataclass(frozen=True)
class ExpertSchedule:
    """The transformers of a checkpoint in schedule order (``model_index.json`` slots) and the boundary timestep
    between them: a step at timestep ``t >= boundary`` runs ``slots[0]``, below it ``slots[1]``."""

    slots: tuple[str, ...] = ("transformer",)
    boundary: float | None = None

    def __post_init__(self) -> None:
        if len(self.slots) not in (1, 2) or (len(self.slots) == 2) != (self.boundary is not None):
            raise ValueError(f"an expert schedule has one transformer, or two and a boundary; got slots "
                             f"{self.slots} and boundary {self.boundary!r}")

    @property
    def experts(self) -> int:
        return len(self.slots)

    def expert(self, timestep: float) -> int:
        """The index (into :attr:`slots`) of the transformer that denoises a step at ``timestep``."""
        if self.boundary is None or timestep >= self.boundary:
            return 0
        return 1


#: a checkpoint with one transformer
ONE_EXPERT = ExpertSchedule()
