"""Whether a Ray cluster can be reached, checked before anything heavy is imported: ``import_ray`` and
``probe_ray_address`` (``check`` and ``serve`` call them first, so an unreachable ``ray_address`` is one line and
exit code 2 within seconds; ``ray.init`` alone retries some unreachable addresses for minutes).
"""

from __future__ import annotations

import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

from omni_runtime.runtime.config import ConfigError

logger = logging.getLogger(__name__)

__all__ = ["CONNECT_TIMEOUT_S", "import_ray", "probe_ray_address"]

CONNECT_TIMEOUT_S = 10.0  # reaching a cluster's head and hearing it speak gRPC


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ConfigError("placement.launcher = 'ray': the ray package is not installed; allowed: 'local', or "
                          "install it with pip install 'omni-runtime[ray]'") from None
    return ray


def _split_address(address: str) -> tuple[str, int]:
    hostport = address[len("ray://"):] if address.startswith("ray://") else address
    host, _, port = hostport.rpartition(":")
    return host.strip("[]"), int(port)


def _auto_address() -> str:
    """What ``ray_address = "auto"`` means to ``ray.init``: ``RAY_ADDRESS``, else the cluster ``ray start``
    recorded in Ray's temp dir on this node (``$RAY_TMPDIR/ray`` or ``/tmp/ray``)."""
    env = os.environ.get("RAY_ADDRESS", "")
    if env and env != "auto":
        return env
    base = os.environ.get("RAY_TMPDIR") or os.environ.get("TMPDIR") or "/tmp"
    record = Path(base) / "ray" / "ray_current_cluster"
    try:
        found = record.read_text().strip()
    except OSError:
        found = ""
    if not found:
        raise ConfigError(f"placement.ray_address = 'auto': no Ray cluster found on this node (RAY_ADDRESS is unset "
                          f"and {record} does not exist); start one with 'ray start --head', give its "
                          f"'host:port', or set ray_address = '' for a private instance")
    return found


_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])  # + an empty SETTINGS


def probe_ray_address(address: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Raise :class:`ConfigError` (one line, naming the key) unless a ``host:port`` Ray address answers like a
    Ray head within ``timeout``: it accepts a tcp connection and speaks gRPC (its HTTP/2 SETTINGS answer the
    client preface). ``ray.init`` itself retries an address that accepts tcp but is no Ray head for minutes.
    ``"auto"`` is the address ``ray.init`` would use (``RAY_ADDRESS``, else the one ``ray start`` recorded on this
    node); ``""`` (a private instance) is not probed."""
    if address == "":
        return
    given = address
    if address == "auto":
        address = _auto_address()
    host, port = _split_address(address)

    def fail(reason: str) -> ConfigError:
        return ConfigError(f"placement.ray_address = {given!r}: cannot reach a Ray head at {host}:{port} "
                           f"({reason}); start one with 'ray start --head' there, or set ray_address = '' for a "
                           f"private instance")

    deadline = time.monotonic() + timeout
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.settimeout(max(0.1, deadline - time.monotonic()))
            sock.sendall(_H2_PREFACE)
            head = b""
            while len(head) < 9:
                chunk = sock.recv(9 - len(head))
                if not chunk:
                    raise fail("it closed the connection without speaking gRPC")
                head += chunk
    except TimeoutError:
        raise fail(f"no gRPC answer within {timeout:g}s") from None
    except OSError as e:
        raise fail(e.strerror or str(e) or type(e).__name__) from None
    if head[3] != 4:  # the first frame of an HTTP/2 server is its SETTINGS (type 4)
        raise fail("it does not speak gRPC")
