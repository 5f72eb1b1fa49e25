"""What a stage replica runs on one batch of :class:`~runtime.messages.Work`: the ``stages`` classes, with the
inputs and outputs moved through ``comm.shm_tensor`` handles.

Every rank of a replica runs :meth:`StageExecutor.run` on the same batch (their collectives pair up); only the
driver publishes what it returns. Inputs are released by the driver after the batch; every executor copies
its inputs out of shm (``torch.stack``) before computing, so when the next stage has a single rank (its driver is
the one reader) the producer may publish through a :class:`comm.shm_tensor.ShmPool` (:meth:`StageExecutor.use_pool`,
chosen by the launcher).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from omni_runtime.comm import shm_tensor
from omni_runtime.runtime.images import encode_image
from omni_runtime.runtime.messages import Work

if TYPE_CHECKING:
    from omni_runtime.parallel.hsdp import HSDPInferenceConfig

logger = logging.getLogger(__name__)


class StageExecutor:
    """Loads one stage and turns a batch into one output per item (a ShmHandle, or image bytes for the VAE)."""

    name = ""
    #: How outputs go to shm: a plain ``put`` (a fresh segment per output) or a pool's ``put``.
    put: Callable[[Any], shm_tensor.ShmHandle] = staticmethod(shm_tensor.put)

    def use_pool(self, pool: shm_tensor.ShmPool) -> None:
        """Publish outputs through ``pool`` (reused segments: no page zeroing per hop). Only valid when the next
        stage has exactly one reader per handle, its driver, which releases it after copying it."""
        self.put = pool.put

    def batch_key(self, w: Work) -> tuple:
        return ()

    def run(self, items: list[Work], publish: bool) -> list[Any]:
        raise NotImplementedError


class TextEncoderExecutor(StageExecutor):
    name = "text_encoder"

    def __init__(self, path: str, dtype: str, device: str, mesh: Any = None,
                 hsdp: HSDPInferenceConfig | None = None) -> None:
        from omni_runtime.stages.text_encoder import TextEncoderStage

        self.stage = TextEncoderStage.from_pretrained(path, dtype, device, hsdp=hsdp)

    def run(self, items: list[Work], publish: bool) -> list[Any]:
        enc = self.stage.encode([w.params.prompt for w in items])
        neg_idx = [i for i, w in enumerate(items) if w.params.negative_prompt is not None
                   and w.params.true_cfg_scale > 1]
        neg = (self.stage.encode([items[i].params.negative_prompt for i in neg_idx]) if neg_idx else None)
        outs: list[Any] = []
        for i in range(len(items)):
            d = {"prompt_embeds": enc["prompt_embeds"][i], "pooled_prompt_embeds": enc["pooled_prompt_embeds"][i]}
            if neg is not None and i in neg_idx:
                j = neg_idx.index(i)
                d["negative_prompt_embeds"] = neg["prompt_embeds"][j]
                d["negative_pooled_prompt_embeds"] = neg["pooled_prompt_embeds"][j]
            outs.append(self.put(d) if publish else None)
        return outs


class DenoiserExecutor(StageExecutor):
    name = "denoiser"

    def __init__(self, path: str, dtype: str, device: str, mesh: Any = None,
                 hsdp: HSDPInferenceConfig | None = None) -> None:
        from omni_runtime.stages.denoiser import DenoiserStage

        self.stage = DenoiserStage.from_pretrained(path, dtype, device, mesh=mesh, hsdp=hsdp)

    def batch_key(self, w: Work) -> tuple:
        p = w.params
        return (p.width, p.height, p.num_inference_steps, p.negative_prompt is not None and p.true_cfg_scale > 1)

    def run(self, items: list[Work], publish: bool) -> list[Any]:
        from omni_runtime.stages.denoiser import DenoiseRequest

        reqs = []
        for w in items:
            t = shm_tensor.get(w.inputs)
            p = w.params
            reqs.append(DenoiseRequest(
                prompt_embeds=t["prompt_embeds"], pooled_prompt_embeds=t["pooled_prompt_embeds"], seed=w.seed,
                height=p.height, width=p.width, num_inference_steps=p.num_inference_steps,
                guidance_scale=p.guidance_scale, true_cfg_scale=p.true_cfg_scale,
                negative_prompt_embeds=t.get("negative_prompt_embeds"),
                negative_pooled_prompt_embeds=t.get("negative_pooled_prompt_embeds")))
        latents = self.stage.denoise(reqs)
        return [self.put(x.contiguous()) if publish else None for x in latents]


class VaeExecutor(StageExecutor):
    name = "vae"

    def __init__(self, path: str, dtype: str, device: str, mesh: Any = None) -> None:
        from omni_runtime.stages.vae import VaeDecoderStage

        self.stage = VaeDecoderStage.from_pretrained(path, dtype, device)

    def batch_key(self, w: Work) -> tuple:
        return (w.params.width, w.params.height)

    def run(self, items: list[Work], publish: bool) -> list[Any]:
        lat = torch.stack([shm_tensor.get(w.inputs) for w in items])
        p = items[0].params
        images = self.stage.decode(lat, p.height, p.width)
        return [encode_image(img, w.params.output_format) if publish else None for img, w in zip(images, items, strict=True)]


EXECUTORS: dict[str, type[StageExecutor]] = {
    "text_encoder": TextEncoderExecutor, "denoiser": DenoiserExecutor, "vae": VaeExecutor}
