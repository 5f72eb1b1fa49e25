"""Bytes between processes: msgspec messages, zero-copy tensor frames, ZMQ channels,
the shared-memory ring-buffer broadcaster, shm tensor handoff, StatelessProcessGroup.

Imports nothing of ours."""
