"""``nn.Linear`` on CPU through oneDNN's inner product instead of torch's BLAS call (issue 16).

torch computes a float32 ``F.linear`` on CPU with the BLAS its wheel was built with (MKL). On the AMD EPYC VM of
``docs/BENCHMARKS.md`` MKL's sgemm ran the denoiser's shapes at about half the speed of oneDNN's inner product
(the library torch ships for its ``mkldnn`` ops, and the one its inductor CPU backend lowers linears to): 0.46x
the time per linear (``tools/bench_cpu_linear.py``), and the small preset's denoiser took 0.65x of diffusers'
time with every linear on oneDNN (``tools/profile_denoiser.py``). The values differ
from torch's by float rounding (another summation order), as a different BLAS's would.

:func:`use_onednn` points the ``forward`` of every plain ``nn.Linear`` of a float32 CPU model at
``torch.ops.mkldnn._linear_pointwise``; :func:`linear_gelu_tanh` runs such a layer and GELU(tanh) as one oneDNN
primitive (the activation in the GEMM's epilogue), and any other layer as the two ops diffusers runs.
``[stages.denoiser] cpu_linear = "torch"`` keeps torch's own linear (see ``docs/USAGE.md``). torch is imported
inside the functions: the config validates ``cpu_linear`` against :data:`CPU_LINEAR` without loading it.
"""

from __future__ import annotations

import functools
import logging
import types
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from torch import nn

logger = logging.getLogger(__name__)

CPU_LINEAR = ("onednn", "torch")
"""Allowed values of ``[stages.denoiser] cpu_linear``."""

_MARK = "_omni_onednn"


def onednn_available() -> bool:
    """Whether this torch build has oneDNN and its fused linear op."""
    import torch

    return bool(torch.backends.mkldnn.is_available()) and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _fits(x: torch.Tensor, weight: torch.Tensor) -> bool:
    import torch

    return (x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and x.numel() > 0 and not torch.is_grad_enabled())


@functools.cache
def _opaque_linear() -> object:
    """oneDNN's linear as an op ``torch.compile`` keeps whole (``omni_runtime::onednn_linear``): inductor lowers
    ``mkldnn._linear_pointwise`` only for weights frozen into the graph, while a compiled block
    (``stages.compile``) takes its weights as inputs (one graph for every block of a class)."""
    import torch

    @torch.library.custom_op("omni_runtime::onednn_linear", mutates_args=(),
                             schema="(Tensor x, Tensor weight, Tensor? bias, str attr, str algorithm) -> Tensor")
    def op(x, weight, bias, attr, algorithm):  # noqa: ANN001, ANN202 - the schema types it
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, attr, [], algorithm)

    @op.register_fake
    def _(x, weight, bias, attr, algorithm):  # noqa: ANN001, ANN202
        return x.new_empty((*x.shape[:-1], weight.shape[0]))

    return op


def _pointwise(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, attr: str = "none",
               algorithm: str = "") -> torch.Tensor:
    """oneDNN's inner product (+ ``attr`` in its epilogue); through :func:`_opaque_linear` while compiling."""
    import torch

    if torch.compiler.is_compiling():  # registered by use_onednn, before any compile
        return torch.ops.omni_runtime.onednn_linear(x, weight, bias, attr, algorithm)
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, attr, [], algorithm)


def _onednn_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    import torch.nn.functional as F

    if not _fits(x, self.weight):  # autograd, another dtype or device, an empty batch: torch's own linear
        return F.linear(x, self.weight, self.bias)
    return _pointwise(x, self.weight, self.bias)


def _self_check() -> str:
    """'' when oneDNN's linear (plain and with GELU) matches torch's on a probe here; else why not."""
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(*s, generator=g) for s in ((3, 5, 24), (40, 24), (40,)))
    try:
        with torch.no_grad():
            plain = torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")
            gelu = torch.ops.mkldnn._linear_pointwise(x, w, b, "gelu", [], "tanh")
    except Exception as e:  # an op whose signature changed in another torch version
        return f"{type(e).__name__}: {e}"
    want = F.linear(x, w, b)
    if not (torch.allclose(plain, want, rtol=1e-4, atol=1e-5)
            and torch.allclose(gelu, F.gelu(want, approximate="tanh"), rtol=1e-4, atol=1e-5)):
        return "its results differ from torch's linear"
    return ""


def use_onednn(model: nn.Module, dtype: torch.dtype, device: torch.device) -> int:
    """Run ``model``'s plain ``nn.Linear`` layers on oneDNN when ``model`` is float32 on CPU; the number of layers
    switched (0: nothing changed: another dtype or device, or oneDNN missing or failing its self-check here).
    Subclasses of ``nn.Linear`` keep their own ``forward``."""
    import torch
    from torch import nn

    if device.type != "cpu" or dtype != torch.float32:
        return 0
    why = "this torch build has no oneDNN linear" if not onednn_available() else _self_check()
    if why:
        logger.warning("cpu_linear = 'onednn' unavailable (%s): the linears stay on torch's own kernel", why)
        return 0
    _opaque_linear()
    n = 0
    for m in model.modules():
        if type(m) is nn.Linear:
            m.forward = types.MethodType(_onednn_forward, m)
            setattr(m, _MARK, True)
            n += 1
    return n


def linear_gelu_tanh(linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``F.gelu(linear(x), approximate="tanh")``; one oneDNN primitive when :func:`use_onednn` switched ``linear``
    (and no LoRA of ``stages.lora`` is active on it in this forward)."""
    import torch.nn.functional as F

    lora = getattr(linear, "_omni_lora", None)  # stages.lora: a LoRA active now is added before the GELU
    if getattr(linear, _MARK, False) and _fits(x, linear.weight) and not (lora is not None and lora[0].active(lora[1])):
        return _pointwise(x, linear.weight, linear.bias, "gelu", "tanh")
    return F.gelu(linear(x), approximate="tanh")
