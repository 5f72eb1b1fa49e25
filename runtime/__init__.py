"""Control plane: config, CLI, process launch and placement, orchestrator, HTTP server, offline API."""
