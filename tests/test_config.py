"""Config parsing: every mistake is one ConfigError naming the key path, the value and what is allowed."""

from pathlib import Path

import pytest

from omni_runtime.parallel.parallel_spec import ParallelSpec
from omni_runtime.runtime.cli import main
from omni_runtime.runtime.config import ConfigError
from omni_runtime.runtime.config_load import load_config
from omni_runtime.runtime.layout import rank_groups
from omni_runtime.runtime.placement import compute_placement

ROOT = Path(__file__).resolve().parent.parent
BASE = """
[model]
path = "models/m"
"""


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.toml"
    p.write_text(text)
    return p


def test_default_configs_load_with_their_degrees():
    got = {}
    for name in ("default", "sp2", "ring2", "usp4"):
        cfg = load_config(ROOT / "configs" / f"{name}.toml")
        p = cfg.stages.denoiser.parallel
        got[name] = (p.ulysses, p.ring, cfg.stages.denoiser.world_size)
        assert cfg.model.path == str(ROOT / "models" / "tiny-flux")
    assert got == {"default": (1, 1, 1), "sp2": (2, 1, 2), "ring2": (1, 2, 2), "usp4": (2, 2, 4)}


def test_relative_model_path_resolves_against_the_config_dir(tmp_path):
    cfg = load_config(_write(tmp_path, BASE))
    assert cfg.model.path == str((tmp_path / "models" / "m").resolve())
    assert cfg.server.port == 8000 and cfg.stages.vae.max_batch_size == 8


@pytest.mark.parametrize("extra, path, value_text, allowed", [
    ("[stages.denoiser.parallel]\nulysess = 2\n", "stages.denoiser.parallel.ulysess", "2", "allowed keys here"),
    ("[server]\nport = \"80\"\n", "server.port", "'80'", "must be an integer"),
    ("[stages.vae]\nbatch_timeout_ms = true\n", "stages.vae.batch_timeout_ms", "True", "must be a finite number"),
    ("[stages.denoiser.parallel]\nulysses = 0\n", "stages.denoiser.parallel.ulysses", "0", ">= 1"),
    ("[stages.text_encoder]\nreplicas = -1\n", "stages.text_encoder.replicas", "-1", ">= 1"),
    ("[stages.vae]\nthreads = -2\n", "stages.vae.threads", "-2", ">= 0"),
    ("[stages.vae]\nthreads = 1.5\n", "stages.vae.threads", "1.5", "must be an integer"),
    ("[server]\nport = 70000\n", "server.port", "70000", "between 0 and 65535"),
    ("[model]\n", "model", "", "table"),  # duplicate table: TOML error is reported with the file
    ("[stages.denoiser]\nmax_batch_size = 1\n[stages.denoiser.parallel]\ncfg = 3\n", "stages.denoiser.parallel.cfg",
     "3 with stages.denoiser.max_batch_size = 1", "allowed: cfg <= 2"),
    ("[stages.denoiser.parallel]\ncfg = 0\n", "stages.denoiser.parallel.cfg", "0", ">= 1"),
    ("[stages.denoiser.parallel]\npp = 2\npp_mode = 'gpipe'\n", "stages.denoiser.parallel.pp_mode", "'gpipe'",
     "allowed values are 'layer', 'pipefusion'"),
    ("[stages.denoiser.parallel]\npp = 2\npp_microbatches = -1\n", "stages.denoiser.parallel.pp_microbatches",
     "-1", "must be an integer (0: the default) >= 0"),
    ("[stages.denoiser.parallel]\npp = 2\npp_microbatches = 1.5\n", "stages.denoiser.parallel.pp_microbatches",
     "1.5", "must be an integer"),
    ("[stages.denoiser.parallel]\npp = 2\npipefusion_warmup = -3\n", "stages.denoiser.parallel.pipefusion_warmup",
     "-3", ">= 0"),
    ("[stages.denoiser.parallel]\npp = 2\npp_mode = 'pipefusion'\npipefusion_patches = 1\n",
     "stages.denoiser.parallel.pipefusion_patches", "1", "at least 2 patches"),
    ("[stages.denoiser.parallel]\npp = 2\npp_mode = 'pipefusion'\nulysses = 2\n", "stages.denoiser.parallel.pp_mode",
     "'pipefusion'", "allowed: ulysses = ring = 1"),
    ("[stages.denoiser.parallel]\npp = 2\nhsdp_shard = 2\n", "stages.denoiser.parallel.pp", "2",
     "allowed: one of them (pp = 1 or hsdp_shard = 1)"),
    ("[stages.vae.parallel]\npatch = 0\n", "stages.vae.parallel.patch", "0", ">= 1"),
    ("[stages.vae]\ntiling = 1\n", "stages.vae.tiling", "1 (int)", "must be true or false"),
    ("[stages.vae]\ntiling = 'yes'\n", "stages.vae.tiling", "'yes' (str)", "must be true or false"),
    ("[stages.vae]\ntiling = true\n[stages.vae.parallel]\npatch = 2\n", "stages.vae.tiling", "true",
     "allowed: one of them"),
    ("[stages.denoiser.parallel]\nulysses = 2\nhsdp_shard = 3\n", "stages.denoiser.parallel.hsdp_shard", "3",
     "does not equal the world size"),
    ("[stages.denoiser]\ndevices = [0]\n[stages.denoiser.parallel]\nulysses = 2\n", "stages.denoiser.devices",
     "['cuda:0']", "need exactly 2"),
    ("[stages.vae]\ndevices = [0]\n", "stages.vae.devices", "['cuda:0']", "CUDA devices with model.device = 'cpu'"),
    ("[stages.vae]\ndevices = ['cpu', 'gpu0']\n", "stages.vae.devices[1]", "'gpu0' (str)", "'cuda:N'"),
    ("[stages.vae]\ndevices = [-1]\n", "stages.vae.devices[0]", "-1 (int)", "index N >= 0"),
    ("[server]\nrequest_timeout_s = nan\n", "server.request_timeout_s", "nan", "must be a finite number"),
    ("[stages.text_encoder]\nbatch_timeout_ms = inf\n", "stages.text_encoder.batch_timeout_ms", "inf", "finite"),
    ("[server]\nport = 80.0\n", "server.port", "80.0 (float)", "must be an integer"),
    ("[stages.denoiser]\nparallel = 2\n", "stages.denoiser.parallel", "2 (int)", "must be a table"),
    ("[stages.denoiser.parallel]\nep = 2\n", "stages.denoiser.parallel.ep", "2", "set dp = 2"),
    ("[stages.denoiser.parallel]\ndp = 2\nep = 2\nall2all_backend = \"x\"\n",
     "stages.denoiser.parallel.all2all_backend", "'x'", "'naive', 'agrs', 'alltoallv'"),
    ("[stages.denoiser.parallel]\nep = 0\n", "stages.denoiser.parallel.ep", "0", ">= 1"),
    ("[stages.denoiser.parallel]\ndp = 2\n", "stages.denoiser.parallel.dp", "2", "set replicas instead"),
    ("[stages.denoiser.parallel]\ndp = 0\n", "stages.denoiser.parallel.dp", "0", ">= 1"),
    ("[stages.denoiser.parallel]\ntp = 2\n", "stages.denoiser.parallel.tp", "2", "tensor parallelism is reserved"),
    ("[stages.denoiser.parallel]\ntp = 'x'\n", "stages.denoiser.parallel.tp", "'x'", "must be an integer"),
    ("[stages.denoiser.parallel]\nhsdp_replicate = 2\n", "stages.denoiser.parallel.hsdp_replicate", "2",
     "hsdp_shard > 1"),
    ("[stages.denoiser.parallel]\nulysses = 2\nhsdp_shard = 4\n", "stages.denoiser.parallel.hsdp_shard", "4",
     "hsdp_shard 4 × hsdp_replicate 1 = 4 does not equal the world size"),
    ("[stages.text_encoder.parallel]\nhsdp_replicate = 3\n", "stages.text_encoder.parallel.hsdp_replicate",
     "3", "hsdp_shard > 1"),
    ("[stages.text_encoder.parallel]\ncfg = 2\n", "stages.text_encoder.parallel.cfg", "2",
     "allowed keys here: hsdp_replicate, hsdp_shard"),
    ("[stages.denoiser.parallel]\npatch = 2\n", "stages.denoiser.parallel.patch", "2", "allowed keys here"),
    ("[stages.vae.parallel]\nulysses = 2\n", "stages.vae.parallel.ulysses", "2", "allowed keys here: patch"),
    ('[server]\napi_key = "sk-\u00e9t\u00e9"\n', "server.api_key", "'\u00e9'", "printable ASCII"),
    ('[server]\napi_key = "sk test"\n', "server.api_key", "' '", "without spaces"),
    ("[server]\nmax_pixels_steps = -1\n", "server.max_pixels_steps", "-1", ">= 0"),
    ("[server]\nmetrics_require_key = 1\n", "server.metrics_require_key", "1 (int)", "true or false"),
    ("[server]\nheader_timeout_s = 0\n", "server.header_timeout_s", "0", "> 0"),
    ("[server]\nbody_timeout_s = -1.5\n", "server.body_timeout_s", "-1.5", "> 0"),
    ("[server]\nkeep_alive_timeout_s = inf\n", "server.keep_alive_timeout_s", "inf", "finite"),
    ("[server]\nmax_connections = 0\n", "server.max_connections", "0", ">= 1"),
    ("[stages.vae]\nmax_batch_pixels = -4\n", "stages.vae.max_batch_pixels", "-4", ">= 0"),
    ("[stages.text_encoder]\nmax_batch_pixels = 4\n", "stages.text_encoder.max_batch_pixels", "4",
     "allowed keys here"),
])
def test_each_mistake_is_one_error_naming_the_key(tmp_path, extra, path, value_text, allowed):
    with pytest.raises(ConfigError) as e:
        load_config(_write(tmp_path, BASE + extra))
    msg = str(e.value)
    if path == "model":  # the duplicate [model] table is a TOML syntax error, reported with the file name
        assert "not valid TOML" in msg and "c.toml" in msg
        return
    assert msg.startswith(path), msg
    assert value_text in msg and allowed in msg, msg


def test_missing_model_path_and_unknown_table(tmp_path):
    with pytest.raises(ConfigError, match=r"^model = 'x' \(str\): must be a table \[model\]$"):
        load_config(_write(tmp_path, "model = 'x'\n"))
    with pytest.raises(ConfigError, match=r"^model\.path: missing"):
        load_config(_write(tmp_path, "[model]\ndtype = 'float32'\n"))
    with pytest.raises(ConfigError, match=r"^stages\.decoder: unknown key.*allowed keys here: denoiser, "
                                          r"text_encoder, vae"):
        load_config(_write(tmp_path, BASE + "[stages.decoder]\nreplicas = 1\n"))


def test_cli_check_exit_codes_and_layout(tmp_path, capsys):
    assert main(["check", str(_write(tmp_path, BASE + "[server]\nbogus = 1\n"))]) == 2
    err = capsys.readouterr().err
    assert "server.bogus: unknown key" in err
    assert main(["check", str(tmp_path / "missing.toml")]) == 2
    assert main(["check", str(_write(tmp_path, BASE))]) == 2  # models/m does not exist and is not ours to make
    assert "model.path = " in capsys.readouterr().err
    assert main(["check", str(ROOT / "configs" / "usp4.toml")]) == 0
    out = capsys.readouterr().out
    assert "denoiser[0] rank 3/4 on cpu: world=[0, 1, 2, 3] sp=[0, 1, 2, 3] ulysses=[2, 3] ring=[1, 3]" in out
    assert "total processes: 6 rank(s) + 1 frontend" in out


def test_group_membership_is_exact():
    # ulysses contiguous, ring strided, then pp, then cfg (rank order tp-sp-pp-cfg-dp)
    g = rank_groups(ParallelSpec(ulysses=2, ring=2, cfg=2))
    assert [x["ulysses"] for x in g] == [[0, 1], [0, 1], [2, 3], [2, 3], [4, 5], [4, 5], [6, 7], [6, 7]]
    assert [x["ring"] for x in g] == [[0, 2], [1, 3], [0, 2], [1, 3], [4, 6], [5, 7], [4, 6], [5, 7]]
    assert [x["cfg"] for x in g] == [[0, 4], [1, 5], [2, 6], [3, 7], [0, 4], [1, 5], [2, 6], [3, 7]]
    assert g[5]["sp"] == [4, 5, 6, 7]


def test_parallel_tables_parse_into_parallel_spec(tmp_path):
    cfg = load_config(_write(tmp_path, BASE + "[stages.denoiser.parallel]\nulysses = 2\nring = 2\n"
                                              "[stages.vae.parallel]\npatch = 1\n"))
    assert cfg.stages.denoiser.parallel == ParallelSpec(ulysses=2, ring=2)
    assert cfg.stages.vae.parallel == ParallelSpec(vae_patch=1)
    assert cfg.stages.denoiser.world_size == 4 and cfg.stages.vae.world_size == 1


def test_layout_replicas_and_devices(tmp_path):
    cfg = load_config(_write(tmp_path, BASE.replace("[model]", "[model]\ndevice = 'cuda'") +
                             "[stages.denoiser]\nreplicas = 2\ndevices = [3, 2, 1, 0]\n"
                             "[stages.denoiser.parallel]\nring = 2\n"))
    den = compute_placement(cfg, str(tmp_path)).of_stage("denoiser")
    assert [[rk.device for rk in r.ranks] for r in den] == [["cuda:3", "cuda:2"], ["cuda:1", "cuda:0"]]


def test_default_config_model_is_created_on_first_use(tmp_path, tiny_dir, capsys):
    from omni_runtime.runtime.model_store import ensure_model

    cfg = tmp_path / "configs" / "default.toml"
    cfg.parent.mkdir()
    cfg.write_text((ROOT / "configs" / "default.toml").read_text())  # as in a fresh checkout: no models/ yet
    assert main(["check", str(cfg)]) == 0
    assert "missing: the embedded tiny FluxPipeline model is created there on first use" in capsys.readouterr().out
    made = ensure_model(load_config(cfg).model.path)
    assert made == tmp_path / "models" / "tiny-flux"
    files = sorted(p.relative_to(made) for p in made.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tiny_dir) for p in tiny_dir.rglob("*") if p.is_file())
    assert all((made / f).read_bytes() == (tiny_dir / f).read_bytes() for f in files)  # the same seeded model
    assert sorted(p.name for p in made.parent.iterdir()) == [".tiny-flux.lock", "tiny-flux"]  # no temp dir left
    assert ensure_model(str(made)) == made


def test_usage_doc_config_block_lists_every_key_with_its_default():
    import re

    import msgspec

    from omni_runtime.runtime.config import ModelConfig, RuntimeConfig
    from omni_runtime.runtime.config_load import tomllib  # stdlib tomllib, or tomli on Python 3.10
    from omni_runtime.runtime.config_schema import _SCHEMA

    doc = (ROOT / "docs" / "USAGE.md").read_text()
    raw = tomllib.loads(re.search(r"```toml\n(.*?)```", doc, re.S).group(1))
    den = raw["stages"]["denoiser"]
    pixel_keys = {"max_batch_pixels": den["max_batch_pixels"]}  # denoiser and vae
    den_only = {k: v for k, v in den.items() if k not in ("parallel", "max_batch_pixels")}  # scheduling, ...
    raw["stages"]["denoiser"] = dict(raw["stages"]["text_encoder"], **pixel_keys, **den_only,
                                     parallel=raw["stages"]["denoiser"]["parallel"])
    raw["stages"]["vae"] = dict(raw["stages"]["text_encoder"], **pixel_keys, **raw["stages"]["vae"])  # + tiling
    documented = msgspec.to_builtins(msgspec.convert(raw, RuntimeConfig))
    defaults = msgspec.to_builtins(RuntimeConfig(model=ModelConfig(path=raw["model"]["path"])))
    assert documented == defaults  # every documented key has the code's default

    def keys(d, prefix=""):  # full table paths: stages.denoiser.parallel.ulysses
        return {prefix + k for k in d} | {x for k, v in d.items() if isinstance(v, dict)
                                          for x in keys(v, prefix + k + ".")}

    # and every key of the code is documented in its own table
    assert keys(raw) >= keys(_SCHEMA)  # the checker's schema: every key a config file may have, by table path
    assert "stages.denoiser.parallel.ulysses" in keys(raw)


def test_usage_doc_unknown_key_example_is_what_the_code_prints():
    """USAGE's example of the unknown-key error, word for word (it listed 10 allowed keys when the code had 14)."""
    import re

    doc = (ROOT / "docs" / "USAGE.md").read_text()
    example = re.search(r"`(stages\.denoiser\.parallel\.ulysess: unknown key[^`]*)`", doc).group(1)
    with pytest.raises(ConfigError) as e:
        load_config_text = BASE + "[stages.denoiser.parallel]\nulysess = 2\n"
        from omni_runtime.runtime.config_load import config_from_dict, tomllib

        config_from_dict(tomllib.loads(load_config_text))
    assert str(e.value) == example


def test_usage_lists_every_shipped_config_and_its_excerpts_match_the_files():
    """USAGE's list of shipped configs names every configs/*.toml, and a TOML block USAGE introduces as
    "`configs/NAME.toml` is this file" parses to what the file parses to."""
    import re

    from omni_runtime.runtime.config_load import tomllib  # stdlib tomllib, or tomli on Python 3.10

    doc = (ROOT / "docs" / "USAGE.md").read_text()
    listed = doc[doc.index("Shipped configs"):].split("\n\n")[0]
    shipped = sorted(p.name for p in (ROOT / "configs").glob("*.toml"))
    assert [n for n in shipped if f"`{n}`" not in listed] == []
    excerpts = re.findall(r"`configs/([\w.]+\.toml)` is this file\S*\n+\s*```toml\n(.*?)```", doc, re.S)
    assert [name for name, _ in excerpts] == ["ray2nodes.toml"]
    for name, block in excerpts:
        block = "\n".join(line[3:] if line.startswith("   ") else line for line in block.splitlines())
        assert tomllib.loads(block) == tomllib.loads((ROOT / "configs" / name).read_text()), name
