"""The one identity of a node: which processes can reach each other's shared memory.

Two processes are on the same node when they see the same hostname, the same kernel boot id and the same
``/dev/shm`` mount (device number). A container with its own ``/dev/shm`` is therefore another node, even on the
same host: handles into its shared memory would not resolve. Used by ``in_the_same_node_as``, the
MessageQueue's local/remote split and the frame transport (a dead producer on this node is noticed at once);
the placement names nodes by :func:`node_name`.

A cluster manager that knows better may name the node: ``OMNI_NODE_ID`` in the environment (the Ray launcher sets
it to the Ray node id of the rank's actor) replaces the computed id, so ranks of two Ray nodes never treat each
other as sharing memory, even when the nodes are logical ones on one host.
"""

from __future__ import annotations

import functools
import logging
import os
import socket

logger = logging.getLogger(__name__)

__all__ = ["NODE_ID_ENV", "node_id", "node_name"]

NODE_ID_ENV = "OMNI_NODE_ID"


@functools.lru_cache(maxsize=1)
def boot_id() -> str:
    """This machine's boot id (changes at every boot: a pid recorded before a reboot names another process)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return "?"


def node_name() -> str:
    """The name other nodes reach this one by (its host name); the first field of :func:`node_id`."""
    return socket.gethostname()


def node_id() -> str:
    """``hostname|boot_id|shm_dev`` of this process (equal strings = same shared-memory domain), or
    ``OMNI_NODE_ID`` when the environment names the node."""
    given = os.environ.get(NODE_ID_ENV)
    if given:
        return given
    try:
        shm_dev = str(os.stat("/dev/shm").st_dev)
    except OSError:
        shm_dev = "?"
    return f"{node_name()}|{boot_id()}|{shm_dev}"
