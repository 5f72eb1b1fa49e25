"""``[stages.denoiser] compile = true``: ``torch.compile`` of the transformer's blocks (regional compilation).

What diffusers' ``compile_repeated_blocks`` does, kept to the denoiser's own seams: the ``forward`` of each block
*class* (``_pp_plan.blocks`` of the family's transformer, e.g. Flux's double- and single-stream blocks) is compiled
once and every block of that class runs that one compiled function; the blocks' weights are inputs of the graph
(dynamo inlines ``nn.Module`` s), so 19 double-stream blocks cost one compile, not 19. The embedders, the output
head and the step loop stay eager; so do the module hooks around a block's ``forward`` (HSDP's FSDP2
all-gather/free, LoRA's per-row hooks, the ``_sp_plan`` split/gather hooks of the model), because only ``forward``
is compiled, not the module call.

Shapes are dynamic (``dynamic=True``): the running set's rows and the sequence length (image size, text length) are
symbols, so step-level batching (rows join and leave at every step) reuses the graph. Sizes 0 and 1 are
specialised by torch (a batch of one row is its own graph) and duck sizing is off (two sizes that happen to be equal
on the first call are not assumed equal later). Recompiles per compiled function are bounded by
:data:`RECOMPILE_LIMIT` (``torch._dynamo.config.recompile_limit``: past it that function runs eager, still
correct), and every compile is logged (``denoiser compile: graph N ...``).

Under sequence parallelism (ulysses or ring > 1) the attention layers run eager inside the compiled blocks
(``torch.compiler.disable``): their all-to-all / ring exchange over a process group is no graph op, so each block is
three graphs: before the attention, the resumed frame that called it (e.g. ``layers.JointAttention.joint``'s flatten
and split: a small graph) and the rest of the block. PipeFusion is refused by the config check (:data:`REFUSED_LAYOUTS`).
"""

from __future__ import annotations

import logging
import time
import types
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

logger = logging.getLogger(__name__)

#: ``torch._dynamo.config.recompile_limit`` while a model is compiled: graphs per compiled block function (one per
#: specialisation: 1 row vs. many, with/without a key padding mask, a LoRA active or not, ...)
RECOMPILE_LIMIT = 8

#: layouts ``compile = true`` refuses, by the config key that selects them, with the reason
PIPEFUSION = "stages.denoiser.parallel.pp_mode = 'pipefusion'"
REFUSED_LAYOUTS = {
    PIPEFUSION:
        "PipeFusion's attention wrapper keeps per-patch state (the other patches' stale keys and values) between "
        "forwards, which a compiled block would guard on and recompile for at every patch",
}


class CompileLog:
    """Counts and logs every graph dynamo compiles in this process while a compiled model is loaded here."""

    def __init__(self) -> None:
        self.graphs = 0
        self._t0 = 0.0
        self._excuse: Callable[[], AbstractContextManager[Any]] | None = None
        self._excused: AbstractContextManager[Any] | None = None

    def excuse(self, paused: Callable[[], AbstractContextManager[Any]]) -> None:
        """Enter ``paused()`` while a graph compiles: a rank's liveness (``runtime.liveness.Busy.paused``) does not
        count a compile, which can take minutes on a CPU, as a stalled step."""
        self._excuse = paused

    def start(self, _args: Any = None) -> None:
        self._t0 = time.monotonic()
        if self._excuse is not None and self._excused is None:
            self._excused = self._excuse()
            self._excused.__enter__()

    def end(self, _args: Any = None) -> None:
        from torch._dynamo.utils import counters

        if self._excused is not None:
            self._excused.__exit__(None, None, None)
            self._excused = None

        graphs = int(counters["stats"]["unique_graphs"])
        if graphs == self.graphs:  # a frame dynamo skipped or ran eager (the attention under SP): no new graph
            return
        self.graphs = graphs
        logger.info("denoiser compile: graph %d compiled in %.1f s (recompile limit %d per block class)",
                    self.graphs, time.monotonic() - self._t0, RECOMPILE_LIMIT)


def _configure_dynamo() -> None:
    import torch
    import torch._dynamo
    import torch.fx.experimental._config as fx_config

    torch._dynamo.config.recompile_limit = RECOMPILE_LIMIT
    fx_config.use_duck_shape = False  # 16 image tokens == head_dim 16 on the first call must not stay tied


def block_list(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks this rank holds (a pipeline stage holds some; the others are missing layers)."""
    from omni_runtime.parallel.strategies.pipeline_parallel import is_missing, plan_of

    return [b for name in plan_of(model).blocks for b in getattr(model, name) if not is_missing(b)]


def compile_blocks(models: list[nn.Module], *, eager_attention: bool = False) -> CompileLog:
    """Point every block's ``forward`` (of every expert in ``models``: they share the compiled forwards) at one
    ``torch.compile`` d ``forward`` per block class (dynamic shapes).
    ``eager_attention``: the attention layers run outside the graphs (sequence parallel: their exchange is a
    process-group call). Returns the log that counts this process's compiled graphs."""
    import torch
    from torch._dynamo.callback import callback_handler

    from omni_runtime.parallel.attention import Attention

    _configure_dynamo()
    compiled: dict[type, Any] = {}
    blocks = [block for model in models for block in block_list(model)]
    for block in blocks:
        fn = type(block).forward
        if fn not in compiled:
            compiled[fn] = torch.compile(fn, dynamic=True)
        block.forward = types.MethodType(compiled[fn], block)
        if eager_attention:
            for m in block.modules():
                if isinstance(m, Attention):
                    m.forward = torch.compiler.disable(m.forward)
    log = CompileLog()
    callback_handler.register_start_callback(log.start)
    callback_handler.register_end_callback(log.end)
    logger.info("denoiser compile: %d blocks share %d compiled forward(s)%s; graphs compile on first use (the "
                "[stages.denoiser] compile_warmup sizes at start)", len(blocks), len(compiled),
                ", attention eager (sequence parallel)" if eager_attention else "")
    return log
