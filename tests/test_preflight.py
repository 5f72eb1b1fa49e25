"""Preflight: ``check`` (and ``serve`` before any stage) reads the model directory without loading weights, bounds
the process/thread counts by the machine, and resolves the host; each problem is one line naming it, exit 2."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from omni_runtime.runtime.cli import main
from omni_runtime.runtime.config import ConfigError
from omni_runtime.runtime.config_load import config_from_dict
from omni_runtime.runtime.preflight import OVERSUBSCRIPTION, check_machine, cpu_cores, cuda_devices
from omni_runtime.stages.errors import CheckpointError
from omni_runtime.stages.model_check import check_model_dir
from omni_runtime.stages.weights import read_safetensors_header


@pytest.fixture()
def model(tiny_dir, tmp_path) -> Path:
    """A private copy of the tiny model to damage."""
    return Path(shutil.copytree(tiny_dir, tmp_path / "model"))


def _config(tmp_path: Path, model: Path, extra: str = "") -> Path:
    p = tmp_path / "c.toml"
    p.write_text(f'[model]\npath = "{model}"\n[server]\nport = 0\n{extra}')
    return p


def _check(capsys, cfg: Path, *cmd: str) -> tuple[int, str]:
    code = main([*(cmd or ("check",)), str(cfg)])
    out = capsys.readouterr()
    return code, out.err if code else out.out


def test_the_tiny_model_passes_and_check_lists_its_components(tmp_path, model, capsys):
    code, out = _check(capsys, _config(tmp_path, model))
    assert code == 0, out
    assert "transformer: FluxTransformer2DModel, 66 tensors" in out and "config OK" in out
    assert "tokenizer_2: T5TokenizerFast" in out and "resolves to 127.0.0.1" in out


def _corrupt_header(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[8:16] = b"#garbage"  # inside the JSON header
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])


def _missing_tokenizer_2(model: Path) -> None:
    shutil.rmtree(model / "tokenizer_2")


def _unknown_class(model: Path) -> None:
    index = json.loads((model / "model_index.json").read_text())
    index["transformer"] = ["diffusers", "SD3Transformer2DModel"]
    (model / "model_index.json").write_text(json.dumps(index))


def _unknown_tokenizer(model: Path) -> None:
    index = json.loads((model / "model_index.json").read_text())
    index["tokenizer"] = ["transformers", "NoSuchTokenizer"]
    (model / "model_index.json").write_text(json.dumps(index))


def _bad_config(model: Path) -> None:
    (model / "vae" / "config.json").write_text("{not json")


@pytest.mark.parametrize("damage, says", [
    (lambda m: _corrupt_header(m / "transformer" / "diffusion_pytorch_model.safetensors"),
     "transformer/diffusion_pytorch_model.safetensors: corrupted safetensors header"),
    (lambda m: _truncate(m / "text_encoder_2" / "model.safetensors"),
     "text_encoder_2/model.safetensors: corrupted or truncated safetensors file"),
    (lambda m: (m / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"\x01"),
     "vae/diffusion_pytorch_model.safetensors: not a safetensors file"),
    (_missing_tokenizer_2, "tokenizer_2: component directory 'tokenizer_2' is missing"),
    (_unknown_class, "transformer = ['diffusers', 'SD3Transformer2DModel'] is not supported; allowed: diffusers "
                     "['FluxTransformer2DModel']"),
    (_unknown_tokenizer, "tokenizer = ['transformers', 'NoSuchTokenizer'] is not supported; allowed: a tokenizer "
                         "class of transformers"),
    (_bad_config, "vae/config.json: not valid JSON"),
])
def test_check_names_the_file_and_the_problem(tmp_path, model, capsys, damage, says):
    damage(model)
    code, err = _check(capsys, _config(tmp_path, model))
    assert code == 2, err
    assert says in err and "Traceback" not in err and err.count("\n") == 1, err


def test_serve_runs_the_same_preflight_before_any_stage(tmp_path, model, capsys):
    _missing_tokenizer_2(model)
    t0 = time.monotonic()
    code, err = _check(capsys, _config(tmp_path, model), "serve")
    assert code == 2 and "tokenizer_2" in err and err.count("\n") == 1, err
    assert time.monotonic() - t0 < 10  # no stage was started


def test_unresolvable_host(tmp_path, model, capsys):
    cfg = _config(tmp_path, model, "")
    cfg.write_text(cfg.read_text().replace("port = 0", 'port = 0\nhost = "no.such.host.invalid"'))
    code, err = _check(capsys, cfg)
    assert code == 2 and "server.host = 'no.such.host.invalid': cannot be resolved" in err, err


def test_safetensors_header_reader_reads_no_weights(tiny_dir):
    path = tiny_dir / "vae" / "diffusion_pytorch_model.safetensors"
    header = read_safetensors_header(path)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        assert sorted(header) == sorted(f.keys())
    assert len(check_model_dir(tiny_dir)) == 7
    with pytest.raises(CheckpointError, match="file not found"):
        check_model_dir(tiny_dir / "nowhere")


def _cfg(**stages) -> object:
    return config_from_dict({"model": {"path": "/nowhere/tiny-flux"}, "stages": stages})


@pytest.mark.parametrize("stages, says", [
    ({"vae": {"threads": 100_000}}, "stages.vae.threads = 100000: at most 8 on this machine (2 CPU core(s) x "
                                    "oversubscription factor 4)"),
    ({"text_encoder": {"replicas": 500}}, "stages.text_encoder.replicas = 500: at most 8"),
    ({"denoiser": {"parallel": {"ulysses": 1000}}},
     "stages.denoiser: replicas x world size = 1 x 1000 = 1000 rank processes (see its parallel degrees); at most 8"),
    ({"denoiser": {"replicas": 4, "parallel": {"ulysses": 2}}},
     "stages.*.replicas and parallel degrees: text_encoder 1 + denoiser 8 + vae 1 = 10 rank processes in all; "
     "at most 8 on this machine (2 CPU core(s) x oversubscription factor 4)"),
])
def test_process_and_thread_counts_are_bounded_by_the_machine(stages, says):
    with pytest.raises(ConfigError) as e:
        check_machine(_cfg(**stages), cores=2)
    assert says in str(e.value), str(e.value)


def test_machine_bounds_what_fits():
    assert "3 rank process(es) of at most 8" in check_machine(_cfg(), cores=2)
    check_machine(_cfg(vae={"threads": 8}, denoiser={"parallel": {"ulysses": 2, "ring": 2}}), cores=2)
    assert cpu_cores() * OVERSUBSCRIPTION >= 3  # the default config runs on this machine


def test_cuda_ranks_need_devices():
    cuda = config_from_dict({"model": {"path": "/nowhere/tiny-flux", "device": "cuda"},
                             "stages": {"denoiser": {"parallel": {"ulysses": 2}}}})
    with pytest.raises(ConfigError, match=r"stages.denoiser: replicas x world size = 1 x 2 = 2 ranks on "
                                          r"model.device = 'cuda' need one CUDA device each; this machine has 1"):
        check_machine(cuda, cores=16, gpus=1, nccl=True)
    assert "2 CUDA device(s)" in check_machine(cuda, cores=16, gpus=2, nccl=True)
    listed = config_from_dict({"model": {"path": "/nowhere/tiny-flux", "device": "cuda"},
                               "stages": {"vae": {"devices": [3]}}})
    with pytest.raises(ConfigError, match=r"stages.vae.devices\[0\] = 'cuda:3': this machine has 2 CUDA device"):
        check_machine(listed, cores=16, gpus=2, nccl=True)


def test_check_reports_the_machine_limit(tmp_path, model, capsys):
    code, err = _check(capsys, _config(tmp_path, model, "[stages.vae]\nthreads = 100000\n"))
    assert code == 2 and "stages.vae.threads = 100000: at most" in err and err.count("\n") == 1, err


@pytest.mark.skipif(cuda_devices() > 0, reason="asserts the refusal on a machine without CUDA")
@pytest.mark.parametrize("extra,says", [
    ("", "model.device = 'cuda': this machine has no CUDA device"),
    ('[stages.denoiser.parallel]\nulysses = 2\n', "model.device = 'cuda': this machine has no CUDA device"),
    ('[stages.denoiser.parallel]\ndp = 2\nep = 2\nall2all_backend = "deepep_high_throughput"\n',
     "model.device = 'cuda': this machine has no CUDA device"),
])
def test_check_refuses_cuda_without_a_gpu_in_one_line(tmp_path, model, capsys, extra, says):
    p = tmp_path / "c.toml"
    p.write_text(f'[model]\npath = "{model}"\ndevice = "cuda"\n[server]\nport = 0\n{extra}')
    code, err = _check(capsys, p)
    assert code == 2 and says in err and err.count("\n") == 1, err


def test_what_cuda_needs_is_checked_per_key():
    def cfg(**parallel):
        return config_from_dict({"model": {"path": "/nowhere/tiny-flux", "device": "cuda"},
                                 "stages": {"denoiser": {"parallel": parallel}}})

    with pytest.raises(ConfigError, match=r"^stages.denoiser: 2 ranks on CUDA exchange tensors over NCCL, which this "
                                          r"torch build lacks .*; allowed: one rank per replica"):
        check_machine(cfg(ulysses=2), cores=16, gpus=2, nccl=False)
    check_machine(cfg(), cores=16, gpus=1, nccl=False)  # one rank per stage needs no NCCL
    deepep = config_from_dict({"model": {"path": "/nowhere/tiny-flux", "device": "cuda", "dtype": "bfloat16"},
                               "stages": {"denoiser": {"parallel": {"dp": 2, "ep": 2,
                                                                    "all2all_backend": "deepep_high_throughput"}}}})
    with pytest.raises(ConfigError, match=r"^stages.denoiser.parallel.all2all_backend = 'deepep_high_throughput': "
                                          r"needs the 'deep_ep' package, which is not importable here; allowed: "
                                          r"'naive', 'agrs', 'alltoallv'$"):
        check_machine(deepep, cores=16, gpus=2, nccl=True, importable=lambda m: False)
    assert "2 CUDA device(s)" in check_machine(deepep, cores=16, gpus=2, nccl=True, importable=lambda m: m == "deep_ep")
    with pytest.raises(ConfigError, match=r"^stages.denoiser.parallel.all2all_backend = 'deepep_low_latency' with "
                                          r"model.dtype = 'float32': DeepEP's kernels take bfloat16 tokens"):
        check_machine(cfg(dp=2, ep=2, all2all_backend="deepep_low_latency"), cores=16, gpus=2, nccl=True,
                      importable=lambda m: True)
    with pytest.raises(ConfigError, match=r"^model.device = 'cuda': this machine has no CUDA device"):
        check_machine(cfg(), cores=16, gpus=0)
