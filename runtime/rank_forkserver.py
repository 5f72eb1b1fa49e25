"""The forkserver every local rank process is forked from: started once per process, with the OpenMP settings of
``runtime.cores.omp_env`` in its environment (libgomp reads them when the forkserver imports torch, so the ranks'
own environment, applied after the fork, would come too late).

Nothing here imports torch: ``serve`` starts the forkserver (:func:`start_early`) right after reading its config,
so the forkserver's ``import torch`` runs on one core while the frontend imports its own modules (torch, FastAPI,
the server) on the other, instead of after them. The launcher then finds it running (:func:`start_forkserver`).
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from omni_runtime.runtime.config import RuntimeConfig

logger = logging.getLogger(__name__)

#: What the forkserver imports before its first fork, so that no rank (nor a restarted one) imports it again: torch,
#: and the model-loading machinery of transformers and diffusers that the text encoder and VAE ranks both need
#: (~2.5 s of CPU each; importing them starts no thread, so forking after them stays safe). Last: the module that
#: lets the forkserver exit at once when the frontend is gone (``runtime.forkserver_quick_exit``).
PRELOAD = ["torch", "transformers.modeling_utils", "diffusers.models.modeling_utils",
           "omni_runtime.runtime.forkserver_quick_exit"]

CTX = mp.get_context("forkserver")
CTX.set_forkserver_preload(PRELOAD)

_forkserver_env: dict[str, str] | None = None  # what this process's forkserver was started with


def start_forkserver(extra: dict[str, str]) -> None:
    """Start the forkserver (once per process) with ``extra`` in its environment; this process's environment is left
    as it was. A second launcher in the same process that wants other settings gets the first one's (logged)."""
    global _forkserver_env
    from multiprocessing import forkserver

    if _forkserver_env is not None:
        if extra != _forkserver_env:
            logger.warning("the rank processes keep the OpenMP settings %s of this process's first launcher, not %s",
                           _forkserver_env or "(libgomp's defaults)", extra or "(libgomp's defaults)")
        forkserver.ensure_running()
        return
    saved = {k: os.environ.get(k) for k in extra}
    os.environ.update(extra)
    try:
        forkserver.ensure_running()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    _forkserver_env = dict(extra)


def start_early(cfg: RuntimeConfig) -> None:
    """Start the forkserver now, with the settings the local launcher will want for ``cfg``'s placement; nothing
    for the Ray launcher, or a config whose placement fails (the launcher reports that error where it always
    does)."""
    import tempfile

    from omni_runtime.comm.instance import RUN_DIR_PREFIX
    from omni_runtime.runtime.config import ConfigError
    from omni_runtime.runtime.cores import core_budget
    from omni_runtime.runtime.placement import compute_placement

    if cfg.placement.launcher != "local":
        return
    run_dir = os.path.join(tempfile.gettempdir(), f"{RUN_DIR_PREFIX}<instance>")  # its name: only for endpoints
    try:
        budget = core_budget(cfg, compute_placement(cfg, run_dir))
    except (ConfigError, ValueError):
        return
    start_forkserver(budget.omp)
