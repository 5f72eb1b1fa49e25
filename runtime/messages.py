"""Messages between the orchestrator and the stage processes (msgspec msgpack, never pickle).

Inbound to a stage driver: :class:`Work` (one image of one request), :class:`Cancel`, :class:`Stop`.
Outbound from a driver: :class:`Ready` (the readiness handshake) and :class:`Result`.
Tensors never travel inside these messages: they are ``comm.shm_tensor`` handles the consumer releases.
"""

from __future__ import annotations

import logging

import msgspec

from omni_runtime.comm.shm_tensor import ShmHandle
from omni_runtime.runtime.requests import GenerationRequest

logger = logging.getLogger(__name__)


class Work(msgspec.Struct, tag="work", kw_only=True):
    req_id: str
    index: int                      # which of the request's n images
    seed: int
    params: GenerationRequest
    inputs: ShmHandle | None = None  # the previous stage's output; this stage releases it
    deadline: float = 0.0           # time.time() after which the work is dropped (0: none)
    sent_at: float = 0.0            # time.time() when the orchestrator sent it (queue-wait metric)


class Cancel(msgspec.Struct, tag="cancel"):
    req_id: str


class Stop(msgspec.Struct, tag="stop"):
    pass


class Batch(msgspec.Struct, tag="batch"):
    """What a driver broadcasts to the other ranks of its replica."""

    items: list[Work]


Inbound = Work | Cancel | Stop
RankMessage = Batch | Stop


class Ready(msgspec.Struct, tag="ready", kw_only=True):
    stage: str
    replica: int
    pids: list[int]


class Result(msgspec.Struct, tag="result", kw_only=True):
    req_id: str
    index: int
    stage: str
    replica: int
    ok: bool = True
    error: str = ""
    user_error: bool = False                # a RequestError: the client's fault (HTTP 400)
    output: ShmHandle | None = None         # text_encoder / denoiser output for the next stage
    image: bytes | None = None              # vae output: the encoded image
    batch_size: int = 1
    first_in_batch: bool = True
    queue_s: float = 0.0                    # sent by the orchestrator -> batch started
    compute_s: float = 0.0


Outbound = Ready | Result
