"""Qwen-Image (diffusers ``QwenImagePipeline``): the second DiT family next to Flux."""
