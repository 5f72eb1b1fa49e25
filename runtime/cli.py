"""The ``omni-runtime`` command line: ``check``, ``serve``, ``generate``, ``batch``.

Exit codes: 0 success, 1 a runtime failure, 2 a usage or config error (argparse's convention).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from importlib.metadata import PackageNotFoundError, version

from omni_runtime.runtime.config import STAGE_NAMES, ConfigError, RuntimeConfig
from omni_runtime.runtime.config_load import load_config

logger = logging.getLogger(__name__)

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


def _version() -> str:
    try:
        return version("omni-runtime")
    except PackageNotFoundError:
        return "unknown"


_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def _port(text: str) -> int:
    """``--port``: an integer 0-65535, checked before any stage process starts."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: must be an integer between 0 and 65535") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{value}: must be between 0 and 65535 (0 picks a free port)")
    return value


def _log_level(text: str) -> str:
    if text.upper() not in _LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"{text!r}: allowed values are {', '.join(_LOG_LEVELS)}")
    return text.upper()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="omni-runtime", description="Serve diffusion transformers.")
    parser.add_argument("--version", action="version", version=f"omni-runtime {_version()}")
    parser.add_argument("--log-level", type=_log_level, default="INFO",
                        help=f"logging level: {', '.join(_LOG_LEVELS)} (default INFO)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("check", help="validate a config and print the placement: nodes, endpoints, rendezvous, devices and groups")
    p.add_argument("config", help="TOML config file")
    p.add_argument("--size", default=None, help="WxH image the VAE patch ranks' row ranges are printed for "
                                                "(default 256x256)")

    p = sub.add_parser("serve", help="start the stage processes and the OpenAI-compatible HTTP server")
    p.add_argument("config", help="TOML config file")
    p.add_argument("--host", default=None, help="override [server] host")
    p.add_argument("--port", type=_port, default=None, help="override [server] port (0-65535)")

    p = sub.add_parser("generate", help="generate one image offline")
    p.add_argument("--config", required=True, help="TOML config file")
    _add_request_args(p)
    p.add_argument("-o", "--output", required=True, help="output image file (.png, .jpg, .webp); a video model's "
                   "video: .mp4 (H.264) or .zip (its frames as lossless PNGs)")
    p.add_argument("--in-process", action="store_true", help="run the pipeline in this process")
    p.add_argument("--image", action="append", default=None, metavar="PATH",
                   help="edit this input image (an image-edit model, e.g. FluxKontextPipeline; --size defaults to "
                        "'auto': its size rounded down to the model's multiple)")
    p.add_argument("--num-frames", dest="num_frames", type=int, default=None,
                   help="a video model's frames (4 k + 1 for Wan, default 81); see runtime/video_request.py")
    p.add_argument("--fps", type=int, default=None, help="frames per second of the .mp4 (default [video] fps)")
    p.add_argument("--guidance-scale-2", dest="guidance_scale_2", type=float, default=None,
                   help="a two-expert (Wan 2.2) video model's guidance of transformer_2's steps (default: "
                        "--guidance-scale); refused for other models")

    p = sub.add_parser("batch", help="generate images for every line of a JSONL file (resumable)")
    p.add_argument("--config", required=True, help="TOML config file")
    p.add_argument("prompts", help="JSONL file: one object per line with 'prompt' and optional fields ('image': "
                                   "an input image path, relative to the file, for an edit)")
    p.add_argument("--out-dir", required=True, help="directory for the images and manifest.jsonl")
    p.add_argument("--in-process", action="store_true", help="run the pipeline in this process")
    return parser


def _add_request_args(p: argparse.ArgumentParser) -> None:
    """One flag per request field that has one in ``runtime.requests.FIELDS``; the values are checked there."""
    from omni_runtime.runtime.requests import FIELDS

    for f in FIELDS.values():
        if f.cli_flag is None:
            continue
        default = "" if f.default is None else f", default {f.default} (or the model family's: omni-runtime check)"
        many = f.kind == "lora"  # --lora NAME[:SCALE], repeatable
        p.add_argument(f.cli_flag, dest=f.name, type=f.cli_type or str, default=None, required=f.required,
                       action="append" if many else "store",
                       help=f"{f.name}: {f.allowed()}{default}" + (" (repeat the flag; NAME[:SCALE])" if many else ""))


def describe(cfg: RuntimeConfig, size: tuple[int, int] | None = None) -> str:
    """What ``check`` prints: the config summary, then the Placement (nodes, endpoints, rendezvous, devices, local
    ranks, groups) exactly as :func:`runtime.placement.compute_placement` gives it to the launcher. ``size``
    (width, height): the image each VAE patch rank's row range is printed for (after the VAE stage line)."""
    from omni_runtime.comm.instance import RUN_DIR_PREFIX
    from omni_runtime.runtime.cores import core_budget
    from omni_runtime.runtime.layout import vae_row_lines
    from omni_runtime.runtime.placement import compute_placement
    from omni_runtime.runtime.preflight import pipeline_lines

    lines = [f"config: {cfg.source or '(in code)'}",
             f"model: {cfg.model.path} ({cfg.model.dtype} on {cfg.model.device})",
             f"server: http://{cfg.server.host}:{cfg.server.port} (auth: {'on' if cfg.server.api_key else 'off'}, "
             f"max_queue {cfg.server.max_queue}/stage, timeout {cfg.server.request_timeout_s:g}s, "
             f"stall_timeout {cfg.server.stall_timeout_s:g}s" + (" (hang detection off)" if not
                                                                  cfg.server.stall_timeout_s else "") + ")"]
    for stage in STAGE_NAMES:
        st = cfg.stages.get(stage)
        spec = getattr(st, "parallel", None)
        extra = f", parallel: {spec.describe()}" if spec is not None else ""
        if stage == "vae" and cfg.stages.vae.tiling:
            extra += ", tiling (approximate)"
        lines.append(f"stage {stage}: {st.replicas} replica(s) x {st.world_size} rank(s), "
                     f"max_batch_size {st.max_batch_size}, batch_timeout_ms {st.batch_timeout_ms:g}{extra}")
        if stage == "denoiser" and st.parallel.pp > 1:
            lines.extend(pipeline_lines(cfg))
        if stage == "vae" and cfg.stages.vae.parallel.vae_patch > 1 and size is not None:
            lines.extend(vae_row_lines(cfg.stages.vae.parallel.vae_patch, *size))
    lines.append(lora_line(cfg))
    if cfg.placement.launcher == "ray":  # connect, let Ray place every replica, start nothing
        from omni_runtime.runtime.ray_launcher import ray_placement

        placement, took = ray_placement(cfg)
        where = repr(cfg.placement.ray_address) if cfg.placement.ray_address else "a private instance (stopped again)"
        lines.append(f"ray: connected to {where} in {took:.1f}s; the nodes below are where Ray placed each rank's "
                     f"bundle")
        lines.append(placement.format())
        return "\n".join(lines)
    # the run directory's name carries the instance id, made when serve starts
    run_dir = os.path.join(tempfile.gettempdir(), f"{RUN_DIR_PREFIX}<instance>")
    placement = compute_placement(cfg, run_dir)
    lines.append(placement.format())
    lines.append(core_budget(cfg, placement).format())
    return "\n".join(lines)


def lora_line(cfg: RuntimeConfig) -> str:
    """``check``'s line about ``[lora]`` (issue 25)."""
    lo = cfg.lora
    names = ", ".join(sorted(lo.adapters)) or "none"
    http = ("POST /v1/loras from " + ", ".join(lo.allowed_roots)) if lo.allowed_roots else \
        "POST /v1/loras off (no allowed_roots)"
    return (f"lora: {len(lo.adapters)} adapter(s) at start ({names}); max_loaded {lo.max_loaded} per denoiser rank "
            f"(replicated on every rank; pp: each rank its layers' only); {http}")


def _cmd_check(args: argparse.Namespace) -> int:
    from omni_runtime.runtime.preflight import preflight
    from omni_runtime.runtime.requests import DEFAULT_SIZE, parse_size

    cfg = load_config(args.config)
    if cfg.placement.launcher == "ray":  # an unreachable cluster is one line at once
        from omni_runtime.runtime.ray_connect import probe_ray_address

        probe_ray_address(cfg.placement.ray_address)
    size = parse_size(args.size if args.size is not None else DEFAULT_SIZE, "--size")
    lines = preflight(cfg)  # machine, host, model: the first problem is the one error line (exit 2)
    print(describe(cfg, size))
    print("\n".join(lines))
    print("config OK")
    return EXIT_OK


def _cmd_serve(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    if cfg.placement.launcher == "ray":  # an unreachable cluster is one line at once, before the server's imports
        from omni_runtime.runtime.ray_connect import probe_ray_address

        probe_ray_address(cfg.placement.ray_address)
    from omni_runtime.runtime.rank_forkserver import start_early

    start_early(cfg)  # the ranks' forkserver imports torch while this process imports the server's modules
    from omni_runtime.runtime.server import serve

    if args.host is not None:
        cfg.server.host = args.host
    if args.port is not None:
        cfg.server.port = args.port
    return serve(cfg)  # runs the preflight before any stage starts


def _cmd_generate(args: argparse.Namespace) -> int:
    from omni_runtime.runtime.offline import generate_to_file
    from omni_runtime.runtime.preflight import check_machine, check_model

    cfg = load_config(args.config)
    check_machine(cfg)
    check_model(cfg)
    generate_to_file(cfg, args, in_process=args.in_process)
    return EXIT_OK


def _cmd_batch(args: argparse.Namespace) -> int:
    from omni_runtime.runtime.offline import run_batch
    from omni_runtime.runtime.preflight import check_machine, check_model

    cfg = load_config(args.config)
    check_machine(cfg)
    check_model(cfg)
    run_batch(cfg, args.prompts, args.out_dir, in_process=args.in_process)
    return EXIT_OK


#: ``generate``'s flags that are not in ``requests.FIELDS`` (the video ones) by the request field they set
_VIDEO_FLAGS = {"num_frames": "--num-frames", "fps": "--fps", "guidance_scale_2": "--guidance-scale-2"}


def _naming_flag(e: Exception, command: str) -> str:
    """``generate``'s error about a request field, prefixed with the flag that set it (``--steps: ...``)."""
    from omni_runtime.runtime.requests import FIELDS

    param = getattr(e, "param", None)
    flag = FIELDS[param].cli_flag if param in FIELDS else _VIDEO_FLAGS.get(param or "")
    text = str(e)
    if command != "generate" or flag is None or text.startswith(flag):
        return text
    return f"{flag}: {text}"


_COMMANDS = {"check": _cmd_check, "serve": _cmd_serve, "generate": _cmd_generate, "batch": _cmd_batch}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from omni_runtime.runtime.requests import RequestError
    from omni_runtime.stages.errors import OmniUserError

    try:
        return _COMMANDS[args.command](args)
    except RequestError as e:
        print(f"omni-runtime {args.command}: error: {_naming_flag(e, args.command)}", file=sys.stderr)
        return EXIT_USAGE
    except (ConfigError, OmniUserError) as e:  # OmniUserError: a checkpoint problem, ...
        print(f"omni-runtime {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as e:  # e.g. an output directory that cannot be written: a message, not a traceback
        print(f"omni-runtime {args.command}: error: {e}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt as e:  # Ctrl-C: one line, no traceback (batch says how far it got)
        print(f"omni-runtime {args.command}: {e or 'interrupted'}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
