"""Messages between the orchestrator and the stage processes (msgspec msgpack, never pickle).

Inbound to a stage driver: :class:`Work` (one image of one request), :class:`Cancel`, :class:`Stop`.
Outbound from a driver: :class:`Ready` (the readiness handshake) and :class:`Result`.
Driver to the other ranks of its replica: :class:`Batch`, then one :class:`StepDecision` per denoising step, and
:class:`Stop`.
Tensors never travel inside these messages: they are :data:`~runtime.tensor_handoff.TensorRef` refs the consumer
releases (``runtime.tensor_handoff``).
"""

from __future__ import annotations

import logging

import msgspec

from omni_runtime.runtime.requests import GenerationRequest
from omni_runtime.runtime.tensor_handoff import TensorRef

logger = logging.getLogger(__name__)


class Work(msgspec.Struct, tag="work", kw_only=True):
    req_id: str
    index: int                      # which of the request's n images
    seed: int
    params: GenerationRequest
    inputs: TensorRef | None = None  # the previous stage's output; this stage releases it
    deadline: float = 0.0           # time.time() after which the work is dropped (0: none)
    sent_at: float = 0.0            # time.time() when the orchestrator sent it (queue-wait metric)


class Cancel(msgspec.Struct, tag="cancel"):
    req_id: str


class Stop(msgspec.Struct, tag="stop"):
    pass


class Batch(msgspec.Struct, tag="batch"):
    """What a driver broadcasts to the other ranks of its replica: the items of the batch all ranks run next."""

    items: list[Work]


class StepDecision(msgspec.Struct, tag="step"):
    """Before each denoising step of a batch, the driver tells the other ranks which items leave the batch now
    (cancelled or past their deadline): every rank takes the same items out."""

    drop: list[int]


Inbound = Work | Cancel | Stop
RankMessage = Batch | StepDecision | Stop


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
    output: TensorRef | None = None         # text_encoder / denoiser output for the next stage
    image: bytes | None = None              # vae output: the encoded image
    batch_size: int = 1
    first_in_batch: bool = True
    queue_s: float = 0.0                    # sent by the orchestrator -> batch started
    compute_s: float = 0.0


Outbound = Ready | Result
