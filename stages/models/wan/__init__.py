"""Wan 2.1 text-to-video (diffusers ``WanPipeline``): the first video family."""
