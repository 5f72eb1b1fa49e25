"""Offline generation: ``omni-runtime generate`` (one image to a file) and ``omni-runtime batch`` (a JSONL file).

``batch`` is resumable: line ``i`` of the prompts file writes ``<i:05d>.<ext>`` (``<i:05d>-<k>.<ext>`` for
``n > 1``) and then appends one line to ``manifest.jsonl``; a rerun skips every line whose manifest entry and
files exist. Images are written to a temporary name and renamed, so an interrupted run never leaves a
truncated image that would count as done. Every line is validated before anything runs; a bad line is an error
naming the line and the field.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tqdm import tqdm

from omni_runtime.runtime.config import RuntimeConfig
from omni_runtime.runtime.edit_requests import (
    edit_rules,
    parse_edit_request,
    read_image_file,
    split_edit_fields,
)
from omni_runtime.runtime.requests import (
    FIELDS,
    GenerationRequest,
    RequestError,
    WorkCaps,
    check_fields,
)
from omni_runtime.runtime.served_model import parse_served, served_model_of

logger = logging.getLogger(__name__)

_EXT = {"png": "png", "jpeg": "jpg", "webp": "webp"}
_FORMAT_OF_SUFFIX = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".webp": "webp"}


def request_from_args(args: argparse.Namespace, output_format: str, caps: WorkCaps | None = None,
                      cfg: RuntimeConfig | None = None) -> GenerationRequest:
    """The request the CLI flags describe (one flag per field of ``requests.FIELDS`` that has one); with
    ``--image`` (and ``cfg``, whose model must edit) an edit of those images."""
    raw: dict[str, Any] = {f.name: getattr(args, f.name, None) for f in FIELDS.values() if f.cli_flag}
    raw["output_format"] = output_format
    raw = {k: v for k, v in raw.items() if v is not None}
    paths = getattr(args, "image", None)
    if paths:
        assert cfg is not None, "an edit needs the config (its model's rules)"
        images = [read_image_file(p, "--image") for p in paths]
        return parse_edit_request(raw, images, edit_rules(cfg), caps=caps, image_param="--image")
    # the served family's defaults of absent flags; e.g. an edit-only model is refused: give --image
    return parse_served(raw, served_model_of(cfg) if cfg is not None else None, caps=caps)


def check_flags(args: argparse.Namespace) -> None:
    """The request flags' values checked against ``requests.FIELDS`` without the model (an edit's ``--size`` may be
    ``auto``: the edit rules check it once the model is read); :class:`RequestError` naming the field."""
    raw = {f.name: getattr(args, f.name, None) for f in FIELDS.values() if f.cli_flag}
    if getattr(args, "image", None):
        raw.pop("size")
    check_fields(raw, FIELDS, allow_unknown=True)


def generate_to_file(cfg: RuntimeConfig, args: argparse.Namespace, in_process: bool = False) -> Path:
    from omni_runtime.runtime.omni import Omni
    from omni_runtime.runtime.video_offline import is_video_output, refuse_images

    if is_video_output(args):
        return generate_video_to_file(cfg, args, in_process)
    out = Path(args.output)
    fmt = _FORMAT_OF_SUFFIX.get(out.suffix.lower())
    if fmt is None:
        raise RequestError(f"--output {str(out)!r}: the suffix must be one of {', '.join(_FORMAT_OF_SUFFIX)}",
                           "output")
    check_flags(args)  # before the model is read (an embedded one would be made first)
    refuse_images(cfg, f"--output {args.output}")
    req = request_from_args(args, fmt, WorkCaps.from_config(cfg), cfg)
    with Omni(cfg, in_process=in_process) as omni:
        data = omni.generate_encoded(req)[0]
    _write_atomic(out, data)
    print(f"wrote {out} (seed {req.seed}, {req.width}x{req.height}, {req.num_inference_steps} steps)")
    return out


def generate_video_to_file(cfg: RuntimeConfig, args: argparse.Namespace, in_process: bool = False) -> Path:
    """``generate`` with a video model: the .mp4 (or .zip of lossless frames) of ``args.output``."""
    from omni_runtime.runtime.omni import Omni
    from omni_runtime.runtime.video_offline import VIDEO_SUFFIXES, video_bytes, video_request_from_args

    out = Path(args.output)
    if out.suffix.lower() not in VIDEO_SUFFIXES:
        raise RequestError(f"--output {str(out)!r}: a video is written as {' or '.join(VIDEO_SUFFIXES)}", "output")
    vr = video_request_from_args(args, cfg)
    with Omni(cfg, in_process=in_process) as omni:
        frames_zip = omni.generate_encoded(vr.req)[0]
    _write_atomic(out, video_bytes(frames_zip, out.suffix.lower(), vr.fps))
    print(f"wrote {out} (seed {vr.req.seed}, {vr.size}, {vr.req.num_frames} frames at {vr.fps} fps, "
          f"{vr.req.num_inference_steps} steps)")
    return out


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def read_prompts(path: str | Path, caps: WorkCaps | None = None, cfg: RuntimeConfig | None = None,
                 video: Callable[[dict], Any] | None = None) -> list[tuple[int, Any]]:
    """Parse and validate every line (blank lines are skipped but keep their number); ``caps`` bound the work. A
    line with ``image`` (a path, relative to the file, or a list of them) is an edit of the ``cfg``'s model.
    ``video``: parses a line with ``num_frames`` or ``seconds`` (a video, ``runtime.video_offline.parse_video``)."""
    rules: list[Any] = []
    reqs: list[tuple[int, Any]] = []
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) else f"not UTF-8 text ({e.reason})"
        raise RequestError(f"prompts file {str(path)!r}: cannot read it ({reason}); allowed: a UTF-8 JSONL "
                           f"file with one JSON object per line", "prompts") from None
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            if isinstance(obj, dict) and "image" in obj:
                fields, images = split_edit_fields(obj, Path(path).parent)
                if not rules:
                    if cfg is None:
                        raise RequestError("image: an edit line needs the config of an image-edit model", "image")
                    rules.append(edit_rules(cfg))
                reqs.append((lineno, parse_edit_request(fields, images, rules[0], caps=caps, allow_unknown=False)))
            elif video is not None and isinstance(obj, dict) and ("num_frames" in obj or "seconds" in obj):
                reqs.append((lineno, video(obj)))
            else:
                # e.g. a generation line for an edit-only model, a cache method it cannot run, is refused
                reqs.append((lineno, parse_served(obj, served_model_of(cfg) if cfg is not None else None,
                                                  allow_unknown=False, caps=caps)))
        except RecursionError:
            raise RequestError(f"{path} line {lineno}: not valid JSON: nested too deeply", None) from None
        except ValueError as e:  # bad JSON or a bad field (RequestError names it)
            param = getattr(e, "param", None)
            raise RequestError(f"{path} line {lineno}: {e}", param) from None
    return reqs


def _done_lines(manifest: Path, out_dir: Path) -> set[int]:
    done: set[int] = set()
    if not manifest.exists():
        return done
    for line in manifest.read_text(encoding="utf-8").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue  # a line cut short by an interruption
        if not isinstance(entry, dict) or not isinstance(entry.get("line"), int):
            continue  # not one of ours: redo rather than crash
        files = entry.get("files")
        if isinstance(files, list) and files and all((out_dir / str(f)).exists() for f in files):
            done.add(entry["line"])
    return done


def _file_names(lineno: int, req: GenerationRequest) -> list[str]:
    ext = _EXT[req.output_format]
    if req.n == 1:
        return [f"{lineno:05d}.{ext}"]
    return [f"{lineno:05d}-{k}.{ext}" for k in range(req.n)]


class BatchInterrupted(KeyboardInterrupt):
    """Ctrl-C during ``batch``: the message says how far it got; the CLI prints it as its one line."""


def run_batch(cfg: RuntimeConfig, prompts: str | Path, out_dir: str | Path, in_process: bool = False,
              max_in_flight: int = 16, omni: Any = None) -> dict[str, int]:
    """Generate every line not done yet; returns ``{"total", "skipped", "generated"}``."""
    from omni_runtime.runtime.video_offline import parse_video, refuse_images, video_bytes

    items = read_prompts(prompts, WorkCaps.from_config(cfg), cfg, video=lambda raw: parse_video(raw, cfg))
    fps = {ln: r.fps for ln, r in items if not isinstance(r, GenerationRequest)}  # the video lines' mp4 rate
    for ln, r in items:
        if isinstance(r, GenerationRequest):
            refuse_images(cfg, f"{prompts} line {ln}")
            break
    items = [(ln, r if isinstance(r, GenerationRequest) else r.req) for ln, r in items]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifest = out / "manifest.jsonl"
    done = _done_lines(manifest, out)
    todo = [(ln, r) for ln, r in items if ln not in done]
    stats = {"total": len(items), "skipped": len(items) - len(todo), "generated": 0}
    if not todo:
        print(f"nothing to do: all {len(items)} line(s) of {prompts} are in {manifest}")
        return stats
    if manifest.exists() and manifest.stat().st_size:
        with open(manifest, "rb") as f:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":  # a line cut short by an interruption: end it so ours start clean
                with open(manifest, "a", encoding="utf-8") as mf:
                    mf.write("\n")
    own = omni is None
    try:
        if own:
            from omni_runtime.runtime.omni import Omni

            omni = Omni(cfg, in_process=in_process)
        with open(manifest, "a", encoding="utf-8") as mf, tqdm(total=len(items), initial=stats["skipped"],
                                                               desc="batch", unit="line") as bar:
            pending: dict[concurrent.futures.Future, tuple[int, GenerationRequest]] = {}
            queue = list(todo)
            while queue or pending:
                while queue and len(pending) < max_in_flight:
                    ln, req = queue.pop(0)
                    pending[omni.submit(req)] = (ln, req)
                finished, _ = concurrent.futures.wait(pending, return_when=concurrent.futures.FIRST_COMPLETED)
                for fut in finished:
                    ln, req = pending.pop(fut)
                    names = [f"{ln:05d}.mp4"] if ln in fps else _file_names(ln, req)  # a video line: its mp4
                    for name, data in zip(names, fut.result(), strict=True):
                        _write_atomic(out / name, video_bytes(data, ".mp4", fps[ln]) if ln in fps else data)
                    mf.write(json.dumps({"line": ln, "files": names, "prompt": req.prompt, "seeds": req.seeds(),
                                         "size": f"{req.width}x{req.height}",
                                         "num_inference_steps": req.num_inference_steps}) + "\n")
                    mf.flush()
                    os.fsync(mf.fileno())
                    stats["generated"] += 1
                    bar.update(1)
    except KeyboardInterrupt:
        interrupted = True
    else:
        interrupted = False
    finally:
        if own and omni is not None:
            omni.close()  # stops the stage processes; work in flight is dropped (its lines are not in the manifest)
    if interrupted:
        done_now = stats["skipped"] + stats["generated"]
        raise BatchInterrupted(f"interrupted: {done_now} of {stats['total']} line(s) done in {manifest}; the same "
                               f"command resumes with the rest")
    return stats
