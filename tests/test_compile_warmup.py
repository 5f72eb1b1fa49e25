"""The compile warm-up (``runtime.orchestrator.Orchestrator._compile_warmup``) sends its 2-image request again until
a denoiser step ran both images together: the two images are two items, and on a busy machine the first could
finish its steps before the second joined, leaving the several-rows graph uncompiled (the first user's request of
several images then compiled it). A fake orchestrator's denoiser reports one item per step for the first send."""

from __future__ import annotations

import asyncio
import types

from omni_runtime.runtime.config_load import config_from_dict
from omni_runtime.runtime.messages import StepReport
from omni_runtime.runtime.orchestrator import WARMUP_ATTEMPTS, Orchestrator


def _fake(widths: list[int]) -> types.SimpleNamespace:
    """An orchestrator whose k-th generate reports steps of ``widths[k]`` items (the last one repeats)."""
    cfg = config_from_dict({"model": {"path": "x"}, "stages": {"denoiser": {"compile": True,
                                                                            "compile_warmup": ["64x64"]}}})
    sent: list[int] = []
    fake = types.SimpleNamespace(cfg=cfg, widest_step=0, progress=types.SimpleNamespace(report=lambda m: None),
                                 metrics=types.SimpleNamespace(observe_step=lambda *a: None), sent=sent)

    async def generate(req):  # noqa: ANN001, ANN202
        sent.append(req.n)
        active = min(req.n, widths[min(len(sent) - 1, len(widths) - 1)])
        Orchestrator._on_report(fake, StepReport(stage="denoiser", replica=0, active=active))

    fake.generate = generate
    return fake


def test_the_two_image_warmup_is_sent_again_until_a_step_ran_both_images() -> None:
    fake = _fake([1, 1, 2])  # the 1-image send, then a 2-image send whose items ran apart, then together
    asyncio.run(Orchestrator._compile_warmup(fake))
    assert fake.sent == [1, 2, 2]


def test_the_warmup_gives_up_after_its_attempts_and_the_start_goes_on() -> None:
    fake = _fake([1])  # the items never share a step (e.g. several denoiser replicas)
    asyncio.run(Orchestrator._compile_warmup(fake))
    assert fake.sent == [1] + [2] * WARMUP_ATTEMPTS
