"""The engine side of streamed partial images, without a server: which steps make a preview, that keeping a preview
changes nothing of the final latents (bit for bit) and that the preview is ``x_t - sigma_t * v`` of its step, and that
the VAE's executor runs a waiting final image before waiting previews."""

from __future__ import annotations

import queue

import pytest
import torch
from stage_refs import denoise_requests, load_stages
from test_batching_window import Engine, Loop, _work

from omni_runtime.runtime.messages import Stop, Work
from omni_runtime.runtime.stage_exec import StageExecutor
from omni_runtime.stages.engine import PREVIEW
from omni_runtime.stages.step_batch import RunningSet, preview_steps


@pytest.mark.parametrize(("steps", "partials", "want"), [
    (8, 3, (2, 4, 6)), (12, 3, (3, 6, 9)), (8, 1, (4,)), (8, 2, (3, 5)), (8, 0, ()), (1, 3, ()), (2, 3, (1,)),
    (3, 3, (1, 2)), (200, 3, (50, 100, 150)),
])
def test_preview_steps_are_evenly_spaced_and_never_the_last(steps, partials, want) -> None:
    assert preview_steps(steps, partials) == want


def test_previews_leave_the_final_latents_unchanged_and_are_the_predicted_clean_latent(tiny_dir) -> None:
    stages = load_stages(tiny_dir)
    st = stages.denoiser
    reqs = denoise_requests(stages, ["a red fox", "a blue bird"], seed=[3, 4], num_inference_steps=6,
                            height=64, width=64)
    plain = RunningSet(st)
    shown = RunningSet(st)
    for i, r in enumerate(reqs):
        plain.admit(i, r)
        r.previews = (2, 4) if i == 0 else ()
        shown.admit(i, r)
    finals_plain, finals_shown, previews = {}, {}, {}
    while plain:
        finals_plain.update(plain.step())
    while shown:
        before = {i: (r.latents[0].clone(), r.sigmas[r.done], r.sigmas[r.done + 1]) for i, r in shown.running.items()}
        finals_shown.update(shown.step())
        for i, (done, x0) in shown.take_previews().items():
            x, sigma, sigma_next = before[i]
            v = (shown.running[i].latents[0] - x) / (sigma_next - sigma)  # the Euler step, solved for the velocity
            previews[(i, done)] = (x0, x - sigma * v, x)
    for i in finals_plain:
        assert torch.equal(finals_plain[i], finals_shown[i])
    assert sorted(previews) == [(0, 2), (0, 4)]
    for x0, want, x in previews.values():
        assert torch.allclose(x0, want, atol=1e-4)
        assert not torch.allclose(x0, x, atol=1e-2)


def test_the_vae_runs_a_waiting_final_image_before_waiting_previews() -> None:
    inbox: queue.Queue = queue.Queue()

    class Vae(Engine):
        def batch_key(self, item) -> tuple:
            return (item.task, item.params.width, item.params.height)

    def preview(rid: str, seed: int) -> Work:
        w = _work(rid)
        w.task, w.seed = PREVIEW, seed
        return w

    final = _work("final")
    final.seed = 100
    # batch 1 runs a lone preview; meanwhile two more previews queue, then a final image
    engine = Vae(inbox, {1: [preview("b", 2), preview("c", 3), final]})
    ex = StageExecutor(engine, "vae", 0, max_batch_size=8, batch_timeout_ms=0)
    loop = Loop(ex, inbox)
    inbox.put(preview("a", 1))
    engine.during[3] = [Stop()]
    loop.loop()
    assert engine.batches == [[1], [100], [2, 3]]
