"""Per-request LoRA through ``serve`` (issue 25): four concurrent requests with different adapter sets (one with
none) share the denoiser's running set; each image equals diffusers' ``load_lora_weights`` + ``set_adapters`` run
alone (max |diff| <= 2/255 on PNG pixels) in the default layout; under CFG parallel 2 (the cfg ranks split the
rows, adapters included), HSDP 2 (adapters replicated: both ranks hold the same bytes) and layer PP 2 (each rank
holds its blocks' layers only) each image equals the default layout's. The config's adapter is preloaded on every
denoiser rank at start and never read again. The registry's routes and every bad input on the same default server: unknown
adapter (400 naming it), another model's adapter and a corrupt file (400 at load, server healthy), a path outside
the allowed roots (403), no API key (401), delete (then 400 for new requests, 404 for a second delete).
"""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import numpy as np
import pytest
from image_bytes import decode_b64
from lora_refs import make_lora
from test_server_harness import ROOT, Server, post_together

pytestmark = [pytest.mark.slow, pytest.mark.distributed, pytest.mark.timeout(300)]

MODEL = ROOT / "models" / "tiny-flux"
SIZE = 64
REQUESTS = [
    {"prompt": "a red barn", "seed": 3, "lora": [{"name": "a", "scale": 1.0}]},
    {"prompt": "two grey cats", "seed": 4, "negative_prompt": "blurry", "true_cfg_scale": 3.0,
     "lora": [{"name": "b", "scale": 0.7}, {"name": "a", "scale": -0.5}]},
    {"prompt": "a lighthouse at dusk", "seed": 5, "lora": [{"name": "b", "scale": 1.2}]},
    {"prompt": "a bowl of fruit", "seed": 6},
]
STEPS = 2


@pytest.fixture(scope="module")
def loras(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from omni_runtime.runtime.model_store import ensure_model

    model = Path(ensure_model(str(MODEL)))
    root = tmp_path_factory.mktemp("lora_root")
    outside = tmp_path_factory.mktemp("lora_outside")
    return {"root": root, "a": make_lora(model, root / "a.safetensors", seed=11, rank=4, alpha=8),
            "b": make_lora(model, root / "b.safetensors", seed=12, rank=2, alpha=None),
            "outside": make_lora(model, outside / "c.safetensors", seed=13)}


def _extra(loras: dict[str, Path]) -> str:
    return (f'\n[lora]\nadapters = {{a = "{loras["a"]}"}}\nmax_loaded = 2\n'
            f'allowed_roots = ["{loras["root"]}"]\n')


def _generate_all(server: Server) -> list[np.ndarray]:
    out = post_together(server, "/v1/images/generations",
                        [{"json": {**req, "size": f"{SIZE}x{SIZE}", "num_inference_steps": STEPS}} for req in REQUESTS])
    return [decode_b64(r.json()["data"][0]["b64_json"]) for r in out]


def _register_b(server: Server, loras: dict[str, Path]) -> None:
    r = httpx.post(server.url + "/v1/loras", json={"name": "b", "path": str(loras["b"])}, headers=server.headers)
    assert r.status_code == 200, r.text
    assert r.json()["rank"] == 2 and r.json()["layers"] > 0


@pytest.fixture(scope="module")
def diffusers_images(loras: dict[str, Path]) -> list[np.ndarray]:
    import torch
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(str(MODEL), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(loras["a"]), adapter_name="a")
    pipe.load_lora_weights(str(loras["b"]), adapter_name="b")
    images = []
    for req in REQUESTS:
        if req.get("lora"):
            pipe.enable_lora()
            pipe.set_adapters([x["name"] for x in req["lora"]], [x["scale"] for x in req["lora"]])
        else:
            pipe.disable_lora()
        kw = {k: v for k, v in req.items() if k in ("prompt", "negative_prompt", "true_cfg_scale")}
        images.append(np.asarray(pipe(**kw, height=SIZE, width=SIZE, num_inference_steps=STEPS, output_type="pil",
                                      generator=torch.Generator("cpu").manual_seed(req["seed"])).images[0]))
    return images


@pytest.fixture(scope="module")
def default_images(tmp_path_factory, loras, diffusers_images) -> list[np.ndarray]:
    """One default-layout server: the routes and bad inputs, then the four concurrent requests."""
    server = Server(tmp_path_factory.mktemp("lora_default"), extra=_extra(loras))
    url, h = server.url, server.headers
    try:
        # [lora] adapters are preloaded: the denoiser rank read 'a' at start, before any request named it
        assert len(re.findall(r"lora 'a' loaded", server.log_text())) == 1, server.log_text()[-3000:]
        # unknown adapter: 400 naming it
        r = httpx.post(url + "/v1/images/generations", headers=h, timeout=60,
                       json={"prompt": "x", "size": "64x64", "num_inference_steps": 1, "lora": [{"name": "b"}]})
        assert r.status_code == 400 and "unknown adapter 'b'" in r.json()["error"]["message"], r.text
        r = httpx.post(url + "/v1/images/generations", headers=h, timeout=60,
                       json={"prompt": "x", "lora": [{"name": "a", "scale": "big"}]})
        assert r.status_code == 400 and r.json()["error"]["param"] == "lora", r.text
        # the registry's routes
        assert httpx.post(url + "/v1/loras", json={"name": "b", "path": str(loras["b"])}).status_code == 401
        r = httpx.post(url + "/v1/loras", json={"name": "c", "path": str(loras["outside"])}, headers=h)
        assert r.status_code == 403 and "allowed_roots" in r.json()["error"]["message"], r.text
        link = loras["root"] / "link.safetensors"  # a symlink out of the root is outside too
        link.unlink(missing_ok=True)
        link.symlink_to(loras["outside"])
        r = httpx.post(url + "/v1/loras", json={"name": "c", "path": str(link)}, headers=h)
        assert r.status_code == 403, r.text
        qwen = ROOT / "models" / "tiny-qwen-image"
        from omni_runtime.runtime.model_store import ensure_model

        other = make_lora(Path(ensure_model(str(qwen))), loras["root"] / "qwen.safetensors", seed=1, qwen=True)
        r = httpx.post(url + "/v1/loras", json={"name": "q", "path": str(other)}, headers=h)
        assert r.status_code == 400 and "another model" in r.json()["error"]["message"], r.text
        bad = loras["root"] / "corrupt.safetensors"
        bad.write_bytes(loras["a"].read_bytes()[:300])
        r = httpx.post(url + "/v1/loras", json={"name": "bad", "path": str(bad)}, headers=h)
        assert r.status_code == 400 and "corrupt" in r.json()["error"]["message"], r.text
        assert httpx.get(url + "/health").status_code == 200
        _register_b(server, loras)
        listed = httpx.get(url + "/v1/loras", headers=h).json()["data"]
        assert [(e["name"], e["source"]) for e in listed] == [("a", "config"), ("b", "api")]
        images = _generate_all(server)
        assert len(re.findall(r"lora 'a' loaded", server.log_text())) == 1  # the requests found it loaded
        # delete: new requests naming it are refused, a second delete is a 404
        assert httpx.delete(url + "/v1/loras/b", headers=h).status_code == 200
        assert httpx.delete(url + "/v1/loras/b", headers=h).status_code == 404
        r = httpx.post(url + "/v1/images/generations", headers=h, timeout=60,
                       json={"prompt": "x", "size": "64x64", "num_inference_steps": 1, "lora": [{"name": "b"}]})
        assert r.status_code == 400, r.text
        assert httpx.get(url + "/health").status_code == 200
        return images
    finally:
        server.stop()
        assert server.shm_entries() == []


def _max_diff(a: np.ndarray, b: np.ndarray) -> int:
    assert a.shape == b.shape == (SIZE, SIZE, 3)
    return int(np.abs(a.astype(int) - b.astype(int)).max())


def test_default_layout_equals_diffusers_set_adapters(default_images, diffusers_images) -> None:
    diffs = [_max_diff(o, r) for o, r in zip(default_images, diffusers_images, strict=True)]
    print("default layout vs diffusers, max |diff| per image:", diffs)
    assert max(diffs) <= 2, diffs
    assert _max_diff(default_images[0], default_images[3]) > 2  # the adapters change the images


@pytest.mark.parametrize(("edit", "logged"), [
    ("cfg = 2", "CFG parallel over 2 ranks"),  # the cfg ranks split the rows, their adapters with them
    ("hsdp_shard = 2", "HSDP: FluxTransformer sharded over [0, 1]"),  # base weights sharded, adapters replicated
    ("pp = 2", "pipeline stage 1/2 holds blocks"),  # micro-batches split the rows; each rank its layers' adapters
], ids=["cfg2", "hsdp2", "pp2"])
def test_parallel_layout_equals_default(tmp_path, loras, default_images, edit, logged) -> None:
    server = Server(tmp_path, extra=_extra(loras), edits={edit.replace("2", "1"): edit})
    try:
        _register_b(server, loras)
        images = _generate_all(server)
        log = server.log_text()
        assert logged in log, log[-3000:]
    finally:
        server.stop()
        assert server.shm_entries() == []
    diffs = [_max_diff(o, r) for o, r in zip(images, default_images, strict=True)]
    print(f"{edit} vs default layout, max |diff| per image:", diffs)
    assert max(diffs) <= 2, diffs
    sizes = re.findall(r"lora 'a' loaded: (\d+) layers, (\d+) bytes", log)
    print(f"{edit}: adapter 'a' per rank (layers, bytes):", sizes)
    assert len(sizes) == 2, sizes
    if edit.startswith("pp"):  # each pipeline stage holds its blocks' layers only: together the whole adapter
        assert sizes[0] != sizes[1] and sum(int(n) for n, _ in sizes) == 16, sizes
    else:  # every rank holds each adapter whole (replicated, also under HSDP): both ranks log the same size
        assert sizes[0] == sizes[1], sizes


def test_python_api_in_process_equals_diffusers(loras, diffusers_images) -> None:
    """``Omni(in_process=True)``: the config's adapter, one registered from Python (no root confinement), the
    ``lora`` keyword of ``generate``; an unknown name is refused naming it."""
    from omni_runtime.runtime import Omni
    from omni_runtime.runtime.config_load import config_from_dict
    from omni_runtime.runtime.orchestrator import BadRequestInStage

    cfg = config_from_dict({"model": {"path": str(MODEL)}, "lora": {"adapters": {"a": str(loras["a"])}}})
    with Omni(cfg, in_process=True) as omni:
        assert omni.load_lora("b", loras["b"])["rank"] == 2
        assert [e["name"] for e in omni.list_loras()] == ["a", "b"]
        diffs = []
        for i in (1, 2):
            req = {k: v for k, v in REQUESTS[i].items() if k != "prompt"}
            img = omni.generate(REQUESTS[i]["prompt"], size=f"{SIZE}x{SIZE}", num_inference_steps=STEPS, **req)[0]
            diffs.append(_max_diff(np.asarray(img), diffusers_images[i]))
        assert max(diffs) <= 2, diffs
        assert omni.unload_lora("b") and not omni.unload_lora("b")
        with pytest.raises(BadRequestInStage, match="unknown adapter 'b'"):
            omni.generate("x", size="64x64", num_inference_steps=1, lora=[{"name": "b"}])
