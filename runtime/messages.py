"""Messages between the orchestrator and the stage processes (msgspec msgpack, never pickle).

Inbound to a stage driver: :class:`Work` (one image of one request), :class:`Cancel`, :class:`Stop`.
Outbound from a driver: :class:`Ready` (the readiness handshake), :class:`Result` and, from the denoiser, one
:class:`StepReport` per denoising step (progress and step metrics) and a :class:`Preview` for each streamed
request's partial image it makes. From every rank: :class:`Heartbeat` (liveness).
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
    task: str = ""                  # "encode": the VAE encodes an edit's input image (stages.engine.StageItem.task)


class Cancel(msgspec.Struct, tag="cancel"):
    req_id: str


class Stop(msgspec.Struct, tag="stop"):
    pass


class Batch(msgspec.Struct, tag="batch"):
    """What a driver broadcasts to the other ranks of its replica: the items of the batch all ranks run next."""

    items: list[Work]


class Admit(msgspec.Struct):
    """An item that joins the running set as ``slot`` (an id unique while it runs)."""

    slot: int
    work: Work


class StepDecision(msgspec.Struct, tag="step"):
    """Before each denoising step the driver tells the other ranks what changes, so every rank runs the same plan.

    Request-level batches (``plan = False``): ``drop`` lists the indices into the batch of the items that leave it
    now (cancelled or past their deadline). Step-level scheduling (``plan = True``): the step plan of the running
    set; ``drop`` lists the slots that leave it (cancelled, expired, or failed), ``admit`` the items that join,
    then every rank runs one step (items that did their last step leave on every rank alike)."""

    drop: list[int]
    admit: list[Admit] = []
    plan: bool = False


Inbound = Work | Cancel | Stop
RankMessage = Batch | StepDecision | Stop


class Ready(msgspec.Struct, tag="ready", kw_only=True):
    stage: str
    replica: int
    pids: list[int]


class ItemProgress(msgspec.Struct, array_like=True):
    req_id: str
    index: int
    done: int     # denoising steps done
    total: int    # its number of steps


class StepReport(msgspec.Struct, tag="steps", kw_only=True):
    """What a denoiser driver reports after each step (metrics, ``GET /v1/requests/{id}`` progress)."""

    stage: str
    replica: int
    step_s: float = 0.0        # the step's compute time
    active: int = 0            # items in the step
    admitted: int = 0          # joined at this step boundary
    retired: int = 0           # left (finished, cancelled, expired) since the previous report
    padding_waste: float = 0.0  # fraction of the step's tokens that were padding
    progress: list[ItemProgress] = []


class Preview(msgspec.Struct, tag="preview", kw_only=True):
    """A denoiser driver's preview of one image of a streamed request (``partial_images``): the predicted clean
    latent after ``step`` of ``total`` steps, for the orchestrator to have decoded (the consumer releases it)."""

    stage: str
    replica: int
    req_id: str
    index: int
    step: int
    total: int
    output: TensorRef


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
    cache: dict[str, int | str] | None = None  # denoiser: what its cache skipped (stages.cache_config.CacheStats)
    peak_memory_mb: float = 0.0             # the driver rank's peak memory while computing it (runtime.peak_memory)


class Heartbeat(msgspec.Struct, tag="beat", kw_only=True):
    """What every rank process sends to the orchestrator's result channel a few times a second from a thread of its
    own (``runtime.stage_shell.Heartbeat``): a stopped or frozen process sends none; ``busy_s`` says how long the
    rank has been in its current step or collective (0 when idle or waiting for work or the node's compute turn)."""

    stage: str
    replica: int
    rank: int
    generation: int
    pid: int
    busy_s: float = 0.0
    waiting_for: str = ""  # waiting for the node's compute turn: who holds it ("" when not waiting)


Outbound = Ready | Result | StepReport | Heartbeat | Preview
