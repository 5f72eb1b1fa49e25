"""Inside one stage: mesh and GroupCoordinator, collectives, parallel attention,
sp_plan hooks, cfg / pipeline / hsdp / vae-patch parallel. May import ``comm``."""
