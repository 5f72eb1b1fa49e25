"""The pieces of the stages, each against diffusers' own code: schedule, latent geometry and noise, text encoding,
VAE decode and postprocessing; request errors that name the field and what is allowed."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline  # noqa: E402
from diffusers.pipelines.flux.pipeline_flux import calculate_shift as diffusers_calculate_shift  # noqa: E402
from stage_refs import denoise_requests, flux_request, load_stages  # noqa: E402

from omni_runtime.stages import DenoiseRequest, DenoiserStage, TextEncoderStage, VaeDecoderStage  # noqa: E402
from omni_runtime.stages.errors import CheckpointError, ConfigError, RequestError  # noqa: E402
from omni_runtime.stages.latents import (  # noqa: E402
    check_image_size,
    initial_noise,
    latent_image_ids,
    pack_latents,
    unpack_latents,
)
from omni_runtime.stages.models.family import family_for_class  # noqa: E402
from omni_runtime.stages.schedule import FlowMatchSchedule, calculate_shift, euler_step  # noqa: E402


@pytest.fixture(scope="module")
def ref(tiny_dir: Path) -> FluxPipeline:
    pipe = FluxPipeline.from_pretrained(tiny_dir, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def ours(tiny_dir: Path):
    return load_stages(tiny_dir)


# ---------------------------------------------------------------------------------------------------------- schedule

SCHEDULER_CONFIGS = [
    dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15),
    dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.3, max_shift=1.5, base_image_seq_len=128,
         max_image_seq_len=8192, time_shift_type="linear"),
    dict(shift=3.0, use_dynamic_shifting=False),
    dict(shift=1.0, use_dynamic_shifting=False),
    dict(shift=2.0, use_dynamic_shifting=True, shift_terminal=0.1),
]


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("config", SCHEDULER_CONFIGS)
@pytest.mark.parametrize(("steps", "seq_len"), [(1, 64), (4, 256), (28, 4096), (50, 1000)])
def test_schedule_is_bit_identical_to_diffusers(config: dict, steps: int, seq_len: int) -> None:
    sched = FlowMatchEulerDiscreteScheduler(**config)
    ours = FlowMatchSchedule.from_config(dict(sched.config))
    mu = diffusers_calculate_shift(seq_len, sched.config.base_image_seq_len, sched.config.max_image_seq_len,
                                   sched.config.base_shift, sched.config.max_shift)
    assert ours.mu(seq_len) == mu == calculate_shift(seq_len, sched.config.base_image_seq_len,
                                                     sched.config.max_image_seq_len, sched.config.base_shift,
                                                     sched.config.max_shift)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    timesteps, sigmas = ours.sigmas(steps, seq_len)
    assert timesteps.dtype == sigmas.dtype == torch.float32
    if steps == 1 and config.get("shift_terminal"):
        # diffusers divides 0 by 0 here and samples with NaN; we keep the single sigma at 1.
        assert torch.isnan(sched.timesteps).all()
        assert timesteps.tolist() == [1000.0] and sigmas.tolist() == [1.0, 0.0]
        return
    assert torch.equal(timesteps, sched.timesteps)
    assert torch.equal(sigmas, sched.sigmas)


def test_euler_step_is_bit_identical_to_diffusers() -> None:
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / 3, 3), mu=0.7)
    sched.set_begin_index(0)
    sigmas = sched.sigmas  # the step itself is what is compared here
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 64, generator=g)
    for i, t in enumerate(sched.timesteps):
        v = torch.randn(2, 16, 64, generator=g)
        want = sched.step(v, t, x, return_dict=False)[0]
        got = euler_step(x, v, sigmas[i], sigmas[i + 1])
        assert torch.equal(got, want)
        x = want


@pytest.mark.parametrize("flag", ["use_karras_sigmas", "stochastic_sampling", "invert_sigmas"])
def test_unsupported_scheduler_options_are_checkpoint_errors(flag: str) -> None:
    with pytest.raises(CheckpointError, match=flag):
        FlowMatchSchedule.from_config({"shift": 1.0, flag: True})


# ---------------------------------------------------------------------------------------------- latents and noise

@pytest.mark.parametrize(("height", "width"), [(256, 256), (208, 144), (16, 48)])
def test_pack_ids_and_noise_match_diffusers(ref: FluxPipeline, height: int, width: int) -> None:
    vsf = ref.vae_scale_factor
    want_lat, want_ids = ref.prepare_latents(1, 16, height, width, torch.float32, torch.device("cpu"),
                                             torch.Generator("cpu").manual_seed(42))
    got = initial_noise(42, 16, height, width, vsf, torch.float32, "cpu")
    assert torch.equal(got, want_lat)
    assert torch.equal(latent_image_ids(height, width, vsf, "cpu", torch.float32), want_ids)
    unpacked = unpack_latents(got, height, width, vsf)
    assert torch.equal(unpacked, FluxPipeline._unpack_latents(want_lat, height, width, vsf))
    assert torch.equal(pack_latents(unpacked), got)
    assert got.shape == (1, (height // 16) * (width // 16), 64)


@pytest.mark.parametrize(("height", "width", "field", "nearest"), [
    (250, 256, "height", "240 or 256"), (256, 1000, "width", "992 or 1008"), (8, 64, "height", "16"), (20, 64, "height", "16 or 32"),
    (0, 64, "height", "16"), (64, -16, "width", "16"),
])
def test_size_not_multiple_of_16_names_size_and_nearest(height: int, width: int, field: str,
                                                        nearest: str) -> None:
    value = height if field == "height" else width
    with pytest.raises(RequestError) as e:
        check_image_size(height, width)
    msg = str(e.value)
    assert f"{field}={value}" in msg and "multiple of 16" in msg and msg.endswith(f"nearest valid {field}: {nearest}")


def test_size_error_through_the_stages(ours) -> None:
    req = flux_request(prompt_embeds=torch.zeros(8, 32), pooled_prompt_embeds=torch.zeros(32), height=100,
                         width=128)
    with pytest.raises(RequestError, match=r"height=100 .* nearest valid height: 96 or 112"):
        ours.denoiser.denoise([req])
    with pytest.raises(RequestError, match="height=130"):
        ours.vae.decode(torch.zeros(64, 64), 130, 128)


@pytest.mark.parametrize(("field", "value", "match"), [
    ("prompt_embeds", torch.zeros(8, 31), "prompt_embeds has width 31; this model takes 32"),
    ("pooled_prompt_embeds", torch.zeros(2, 32), "pooled_prompt_embeds has shape \\(2, 32\\); expected \\(dim,\\)"),
    ("prompt_embeds", torch.zeros(2, 8, 32), "prompt_embeds has shape \\(2, 8, 32\\); expected \\(seq, dim\\)"),
    ("prompt_embeds", [[0.0] * 32], "prompt_embeds is a list; expected a tensor"),
])
def test_bad_request_fields_are_request_errors(ours, field: str, value: object, match: str) -> None:
    kw = dict(prompt_embeds=torch.zeros(8, 32), pooled_prompt_embeds=torch.zeros(32), height=64, width=64,
              num_inference_steps=1)
    kw[field] = value
    with pytest.raises(RequestError, match=match):
        ours.denoiser.denoise([flux_request(**kw)])


def test_request_numbers_are_not_revalidated_by_the_denoiser(ours) -> None:
    """Steps, seed and guidance are validated once, at the API edge (runtime.requests); the stage only asserts."""
    kw = dict(prompt_embeds=torch.zeros(8, 32), pooled_prompt_embeds=torch.zeros(32), height=64, width=64)
    for field, value in (("num_inference_steps", 0), ("seed", -1)):
        with pytest.raises(AssertionError):
            ours.denoiser.denoise([flux_request(**{**kw, "num_inference_steps": 1, field: value})])
    with pytest.raises(RequestError, match="max_sequence_length=513 .* from 1 to 512"):
        ours.text_encoder.encode("a", max_sequence_length=513)


# ------------------------------------------------------------------------------------------------------ text encoder

@pytest.mark.parametrize("max_sequence_length", [512, 77, 7])
def test_text_encoder_equals_encode_prompt(ref: FluxPipeline, ours, max_sequence_length: int) -> None:
    prompts = ["a photo of a cat", "", "the dog " * 60]  # empty, and one longer than CLIP's 77 tokens
    with torch.no_grad():
        want_embeds, want_pooled, want_ids = ref.encode_prompt(prompts, prompt_2=None,
                                                               max_sequence_length=max_sequence_length)
    got = ours.text_encoder.encode(prompts, max_sequence_length=max_sequence_length)
    assert set(got) == {"prompt_embeds", "pooled_prompt_embeds", "text_ids"}
    assert got["prompt_embeds"].shape == (3, max_sequence_length, 32)
    assert torch.equal(got["prompt_embeds"], want_embeds)
    assert torch.equal(got["pooled_prompt_embeds"], want_pooled)
    assert torch.equal(got["text_ids"], want_ids)
    # Batched encoding equals one prompt at a time.
    for i, p in enumerate(prompts):
        one = ours.text_encoder.encode(p, max_sequence_length=max_sequence_length)
        torch.testing.assert_close(one["prompt_embeds"][0], got["prompt_embeds"][i], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(one["pooled_prompt_embeds"][0], got["pooled_prompt_embeds"][i],
                                   rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------------------------- VAE

def test_vae_decode_equals_diffusers_decode_and_postprocess(ref: FluxPipeline, ours) -> None:
    height, width = 128, 96
    g = torch.Generator().manual_seed(3)
    packed = torch.randn(2, (height // 16) * (width // 16), 64, generator=g) * 1.5
    lat = FluxPipeline._unpack_latents(packed, height, width, ref.vae_scale_factor)
    lat = lat / ref.vae.config.scaling_factor + ref.vae.config.shift_factor
    with torch.no_grad():
        decoded = ref.vae.decode(lat, return_dict=False)[0]
        # on CPU our decoder runs channels-last (faster there): the same values up to float rounding
        assert ours.vae.channels_last and ours.vae.vae.decoder.conv_in.weight.is_contiguous(
            memory_format=torch.channels_last)
        torch.testing.assert_close(ours.vae.decode_latents(lat), decoded, rtol=1e-5, atol=1e-5)
    want = ref.image_processor.postprocess(decoded, output_type="pil")
    got = ours.vae.decode(packed, height, width)
    assert len(got) == 2
    for a, b in zip(got, want, strict=True):
        assert a.dtype == np.uint8 and a.shape == (height, width, 3)
        assert np.abs(a.astype(int) - np.asarray(b)).max() <= 1  # a rounding edge may flip one level
    # A list of per-request latents decodes the same as the stacked batch.
    assert all(np.array_equal(a, b) for a, b in zip(ours.vae.decode(list(packed), height, width), got, strict=True))
    # So does a list mixing a (2, tokens, C) batch and a (tokens, C) latent; every row is decoded, none dropped.
    mixed = ours.vae.decode([packed, packed[1]], height, width)
    assert len(mixed) == 3  # (a batch of 3 convolves in another blocking than 2: uint8 within 1)
    assert all(np.abs(a.astype(int) - b).max() <= 1 for a, b in zip(mixed, [*got, got[1]], strict=True))
    assert ours.vae.decode([], height, width) == []


def test_vae_latents_that_do_not_fit_the_size_are_request_errors(ours) -> None:
    with pytest.raises(RequestError, match=r"latents have shape \(1, 48, 64\); a 128x128 image takes packed latents "
                                           r"\(64, 64\)"):
        ours.vae.decode(torch.zeros(48, 64), 128, 128)
    with pytest.raises(RequestError, match=r"latents have shape \(2, 64, 32\)"):
        ours.vae.decode(torch.zeros(2, 64, 32), 128, 128)


# -------------------------------------------------------------------------------------------- loading and progress

@pytest.mark.parametrize(("component", "stage"), [("text_encoder_2", TextEncoderStage), ("vae", VaeDecoderStage),
                                                  ("transformer", DenoiserStage), ("scheduler", DenoiserStage)])
def test_missing_component_is_a_checkpoint_error_naming_it(tiny_dir: Path, tmp_path: Path, component: str,
                                                           stage: type) -> None:
    broken = _broken_copy(tiny_dir, tmp_path)
    shutil.rmtree(broken / component)
    with pytest.raises(CheckpointError, match=component):
        stage.from_pretrained(broken, "float32", "cpu")


@pytest.mark.parametrize("stage", [TextEncoderStage, DenoiserStage, VaeDecoderStage])
def test_bad_dtype_and_device_are_config_errors_naming_the_value(tiny_dir: Path, stage: type) -> None:
    with pytest.raises(ConfigError, match=r"dtype='float8' is not supported; allowed: \['bf16', 'bfloat16'"):
        stage.from_pretrained(tiny_dir, "float8", "cpu")
    with pytest.raises(ConfigError, match=r"dtype=torch.int8 is not supported"):
        stage.from_pretrained(tiny_dir, torch.int8, "cpu")
    with pytest.raises(ConfigError, match="device='tpu:0'.*allowed: 'cpu', 'cuda', 'cuda:N'"):
        stage.from_pretrained(tiny_dir, "float32", "tpu:0")


def test_cuda_device_must_exist(monkeypatch: pytest.MonkeyPatch) -> None:
    from omni_runtime.stages.device import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="device='cuda:0' is not available: this machine has no CUDA device"):
        resolve_device("cuda:0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda:1") and resolve_device("cuda") == torch.device("cuda")
    with pytest.raises(ConfigError, match=r"device='cuda:2' .* has 2 CUDA device\(s\); allowed: 'cpu', 'cuda:0' "
                                          r"to 'cuda:1'"):
        resolve_device("cuda:2")
    assert resolve_device("cpu") == torch.device("cpu")


def test_progress_bar_only_when_asked(ours, capsys: pytest.CaptureFixture[str]) -> None:
    reqs = denoise_requests(ours, "a cat", height=64, width=64, num_inference_steps=2, max_sequence_length=8)
    quiet = ours.denoiser.denoise(reqs)
    assert "denoise" not in capsys.readouterr().err
    loud = ours.denoiser.denoise(reqs, progress=True)
    err = capsys.readouterr().err
    assert "denoise" in err and "0/2" in err
    assert torch.equal(quiet[0], loud[0])


def _broken_copy(tiny_dir: Path, tmp_path: Path) -> Path:
    broken = tmp_path / "model"
    shutil.copytree(tiny_dir, broken)
    return broken


@pytest.mark.parametrize(("component", "filename", "stage"), [
    ("text_encoder_2", "model.safetensors", TextEncoderStage),
    ("text_encoder", "model.safetensors", TextEncoderStage),
    ("vae", "diffusion_pytorch_model.safetensors", VaeDecoderStage),
    ("transformer", "diffusion_pytorch_model.safetensors", DenoiserStage),
])
def test_truncated_weights_are_checkpoint_errors_naming_the_component(tiny_dir: Path, tmp_path: Path,
                                                                       component: str, filename: str,
                                                                       stage: type) -> None:
    broken = _broken_copy(tiny_dir, tmp_path)
    f = broken / component / filename
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=component):
        stage.from_pretrained(broken, "float32", "cpu")


def _edit_json(path: Path, key: str, value: object) -> None:
    import json

    data = json.loads(path.read_text())
    data[key] = value
    path.write_text(json.dumps(data))


def test_unknown_class_in_model_index_is_a_checkpoint_error(tiny_dir: Path, tmp_path: Path) -> None:
    broken = _broken_copy(tiny_dir, tmp_path)
    _edit_json(broken / "model_index.json", "text_encoder_2", ["transformers", "BertModel"])
    with pytest.raises(CheckpointError, match=r"text_encoder_2 = \['transformers', 'BertModel'\].*T5EncoderModel"):
        TextEncoderStage.from_pretrained(broken)


@pytest.mark.parametrize(("config", "found", "allowed", "stage"), [
    ("scheduler/scheduler_config.json", "DDIMScheduler", "FlowMatchEulerDiscreteScheduler", DenoiserStage),
    ("vae/config.json", "AutoencoderTiny", "AutoencoderKL", VaeDecoderStage),
])
def test_unknown_class_name_in_a_component_config_is_a_checkpoint_error(
        tiny_dir: Path, tmp_path: Path, config: str, found: str, allowed: str, stage: type) -> None:
    broken = _broken_copy(tiny_dir, tmp_path)
    _edit_json(broken / config, "_class_name", found)
    with pytest.raises(CheckpointError, match=rf"{config}: _class_name='{found}' is not supported; "
                                              rf"allowed: \['{allowed}'\]"):
        stage.from_pretrained(broken)


def test_denoise_unpack_returns_vae_layout(ours) -> None:
    reqs = denoise_requests(ours, ["a cat", "a dog"], seed=[4, 5], height=96, width=64, num_inference_steps=1,
                            max_sequence_length=8)
    packed = ours.denoiser.denoise(reqs)
    unpacked = ours.denoiser.denoise(reqs, unpack=True)
    for p, u in zip(packed, unpacked, strict=True):
        assert p.shape == (24, 64) and u.shape == (16, 12, 8)
        assert torch.equal(u, unpack_latents(p[None], 96, 64, 8)[0])


class _RowwiseModel(torch.nn.Module):
    """A stand-in denoiser whose every output row depends only on its own inputs, through elementwise ops (so a
    batch is bit-identical to single runs), and on the last text token (so the text length matters)."""

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                pooled_projections: torch.Tensor, timestep: torch.Tensor, img_ids: torch.Tensor,
                txt_ids: torch.Tensor, guidance: torch.Tensor | None = None) -> torch.Tensor:
        assert txt_ids.shape == (encoder_hidden_states.shape[1], 3)
        text = encoder_hidden_states[:, -1:, :1] + pooled_projections[:, None, :1]
        return hidden_states * 0.75 + text - timestep[:, None, None]


def _rowwise_stage(dtype: torch.dtype) -> DenoiserStage:
    config = {"in_channels": 64, "guidance_embeds": False, "joint_attention_dim": 32, "pooled_projection_dim": 32}
    return DenoiserStage(_RowwiseModel(), config, FlowMatchSchedule(shift=3.0), 8, dtype, torch.device("cpu"),
                         family=family_for_class("FluxPipeline"))


def _cfg_request(seed: int, scale: float, neg_len: int = 8) -> DenoiseRequest:
    g = torch.Generator().manual_seed(100 + seed)
    return flux_request(
        prompt_embeds=torch.randn(8, 32, generator=g), pooled_prompt_embeds=torch.randn(32, generator=g),
        negative_prompt_embeds=torch.randn(neg_len, 32, generator=g),
        negative_pooled_prompt_embeds=torch.randn(32, generator=g), seed=seed, height=64, width=48,
        num_inference_steps=3, true_cfg_scale=scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batch_mixing_true_cfg_scales_is_bit_identical_to_single_runs(dtype: torch.dtype) -> None:
    """Each row's scale is applied as diffusers applies it (a Python number), not rounded to the latent dtype
    (3.3 is 3.296875 in bfloat16)."""
    stage = _rowwise_stage(dtype)
    reqs = [_cfg_request(0, 3.3), _cfg_request(1, 1.7), _cfg_request(2, 3.3)]
    batched = stage.denoise(reqs)
    for req, got in zip(reqs, batched, strict=True):
        single = stage.denoise([req])[0]
        assert got.dtype == dtype and torch.equal(got, single)
    assert not torch.equal(batched[0], batched[2])  # the seeds reach the rows


def test_negative_prompt_of_another_length_is_a_request_error() -> None:
    """diffusers rejects prompt and negative embeddings of different shapes; so do we, naming both lengths."""
    stage = _rowwise_stage(torch.float32)
    with pytest.raises(RequestError, match="negative_prompt_embeds has 5 tokens and prompt_embeds 8; they must be "
                                           "equal"):
        stage.denoise([_cfg_request(0, 2.5, neg_len=5)])
    stage.denoise([_cfg_request(0, 1.0, neg_len=5)])  # without true CFG the negative is unused, as in diffusers


def test_stop_hook_takes_requests_out_between_steps_and_the_others_are_unchanged() -> None:
    """A request the hook names leaves the batch before the next step (None out, no more model rows for it);
    the requests that stay give exactly their solo result (row-wise model: bit-identical)."""
    stage = _rowwise_stage(torch.float32)
    rows: list[int] = []
    stage.model.register_forward_pre_hook(lambda _m, args, kwargs: rows.append(kwargs["hidden_states"].shape[0]),
                                          with_kwargs=True)
    reqs = [_cfg_request(0, 2.0), _cfg_request(1, 3.0), _cfg_request(2, 2.0)]
    asked: list[int] = []

    def stop(step: int) -> list[int]:
        asked.append(step)
        return [1] if step == 1 else ([0] if step == 2 else [])

    out = stage.denoise(reqs, stop=stop)
    assert asked == [0, 1, 2]
    assert rows == [6, 4, 2]  # true CFG doubles the rows: 3 requests, then 2, then 1
    assert out[0] is None and out[1] is None
    assert torch.equal(out[2], stage.denoise([reqs[2]])[0])
    assert stage.denoise(reqs, stop=lambda step: [0, 1, 2]) == [None, None, None]


def test_the_step_level_engine_methods_are_declared_in_the_engine_protocol(tiny_dir):
    """The runtime calls admit/drop/run_step/... through ``stages.engine.StepEngine``, not duck-typed under
    ``# type: ignore``; the denoiser engine implements it."""
    import inspect

    from omni_runtime.runtime import driver_loop, stage_exec
    from omni_runtime.stages.engine import DenoiserEngine, StepEngine, load_engine

    engine = load_engine("denoiser", tiny_dir, "float32", "cpu")
    assert isinstance(engine, DenoiserEngine) and isinstance(engine, StepEngine)
    assert not isinstance(load_engine("vae", tiny_dir, "float32", "cpu"), StepEngine)
    assert "type: ignore[attr-defined]" not in inspect.getsource(stage_exec) + inspect.getsource(driver_loop)
