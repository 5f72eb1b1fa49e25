"""The sequence-parallel plan every family's transformer declares: its denoised tokens are split, the text is not."""

from __future__ import annotations

from omni_runtime.parallel.sp_plan import (
    SequenceParallelInput,
    SequenceParallelModelPlan,
    SequenceParallelOutput,
)


def token_sp_plan() -> SequenceParallelModelPlan:
    """A new ``_sp_plan``: each rank takes a slice of ``hidden_states``' tokens (dim 1) and of their position ids
    ``img_ids`` (dim 0), so its rotary embeddings are its own tokens'; slices may be uneven (e.g. 117 tokens over 2
    ranks). The text stays whole on every rank. The prediction is gathered back after ``proj_out`` (dim 1)."""
    return {
        "": {
            "hidden_states": SequenceParallelInput(split_dim=1, expected_dims=3),
            "img_ids": SequenceParallelInput(split_dim=0, expected_dims=2),
        },
        "proj_out": SequenceParallelOutput(gather_dim=1, expected_dims=3),
    }
