"""Our own single-file model implementations whose parameter names mirror the diffusers checkpoints."""
