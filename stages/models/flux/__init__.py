"""FLUX.1 (diffusers ``FluxPipeline``): the family's declarations (``family.py``), its transformer and its tiny model."""
