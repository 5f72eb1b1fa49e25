"""Flow-match Euler schedule as FluxPipeline drives diffusers' FlowMatchEulerDiscreteScheduler.

FluxPipeline passes ``sigmas = linspace(1, 1/steps, steps)`` and ``mu = calculate_shift(image_seq_len)``;
the scheduler then shifts the sigmas (dynamically with ``mu``, or statically with ``shift``), optionally
stretches them to ``shift_terminal``, and appends a final 0. Each Euler step is
``x + (sigma_next - sigma) * v`` computed in fp32. The arithmetic below follows the same numpy/torch
dtypes so the timesteps are bit-identical.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from omni_runtime.stages.errors import CheckpointError
from omni_runtime.stages.weights import component_dir, read_config

logger = logging.getLogger(__name__)

CLASS_NAMES = ("FlowMatchEulerDiscreteScheduler",)
#: multistep flow solvers a pipeline that calls ``set_timesteps(steps)`` itself may ship (WanPipeline's default):
#: stepped by a per-request instance of diffusers' own class (:class:`DiffusersStepper`)
MULTISTEP_CLASSES = ("UniPCMultistepScheduler",)
SCHEDULER_CONFIG = "scheduler_config.json"
_UNSUPPORTED_FLAGS = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "invert_sigmas",
                      "stochastic_sampling")


def calculate_shift(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096,
                    base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """``mu`` for dynamic shifting: linear in the number of image tokens (FluxPipeline's formula)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    b = base_shift - m * base_seq_len
    return image_seq_len * m + b


@dataclass(frozen=True)
class FlowMatchSchedule:
    """The parts of a ``FlowMatchEulerDiscreteScheduler`` config that FluxPipeline's sampling uses."""

    num_train_timesteps: int = 1000
    shift: float = 1.0
    use_dynamic_shifting: bool = False
    base_shift: float = 0.5
    max_shift: float = 1.15
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096
    shift_terminal: float | None = None
    time_shift_type: str = "exponential"
    #: the pipeline calls ``set_timesteps(steps)`` without sigmas (WanPipeline): the scheduler's own timesteps,
    #: ``linspace`` from its largest to its smallest training timestep, then shifted (computed by diffusers'
    #: scheduler itself); False: the pipeline passes ``sigmas = linspace(1, 1/steps, steps)`` (FluxPipeline)
    scheduler_timesteps: bool = False
    #: a multistep solver (:data:`MULTISTEP_CLASSES`): its class and config as JSON; None: flow-match Euler
    stepper: tuple[str, str] | None = None

    @classmethod
    def from_config(cls, config: dict[str, Any], source: str = "scheduler config") -> FlowMatchSchedule:
        """Build from a scheduler ``config.json`` dict; options we do not implement are an error."""
        for flag in _UNSUPPORTED_FLAGS:
            if config.get(flag):
                raise CheckpointError(f"{source}: {flag}={config[flag]!r} is not supported; "
                                      f"only plain flow-match Euler sampling is ({flag} must be false)")
        tst = config.get("time_shift_type", "exponential")
        if tst not in ("exponential", "linear"):
            raise CheckpointError(f"{source}: time_shift_type={tst!r}; allowed: 'exponential', 'linear'")
        # FluxPipeline reads these four with the same defaults when the key is absent.
        return cls(
            num_train_timesteps=int(config.get("num_train_timesteps", 1000)),
            shift=float(config.get("shift", 1.0)),
            use_dynamic_shifting=bool(config.get("use_dynamic_shifting", False)),
            base_shift=config.get("base_shift", 0.5) if config.get("base_shift") is not None else 0.5,
            max_shift=config.get("max_shift", 1.15) if config.get("max_shift") is not None else 1.15,
            base_image_seq_len=config.get("base_image_seq_len", 256),
            max_image_seq_len=config.get("max_image_seq_len", 4096),
            shift_terminal=config.get("shift_terminal"),
            time_shift_type=tst,
        )

    @classmethod
    def from_pretrained(cls, path: str | Path, multistep: bool = False) -> FlowMatchSchedule:
        """Read ``<model dir>/scheduler/scheduler_config.json``, which must be a FlowMatchEulerDiscreteScheduler's
        (``multistep``: or a flow-prediction :data:`MULTISTEP_CLASSES` solver's, for a pipeline that calls
        ``set_timesteps(steps)`` itself)."""
        directory = component_dir(path, "scheduler")
        source = directory / SCHEDULER_CONFIG
        config = read_config(directory, SCHEDULER_CONFIG,
                             allowed_classes=CLASS_NAMES + (MULTISTEP_CLASSES if multistep else ()))
        name = config.get("_class_name")
        if name in MULTISTEP_CLASSES:
            if config.get("prediction_type") != "flow_prediction" or not config.get("use_flow_sigmas"):
                raise CheckpointError(f"{source}: {name} with prediction_type={config.get('prediction_type')!r}, "
                                      f"use_flow_sigmas={config.get('use_flow_sigmas')!r}; allowed: a flow solver "
                                      f"(prediction_type 'flow_prediction', use_flow_sigmas true)")
            return cls(num_train_timesteps=int(config.get("num_train_timesteps", 1000)), scheduler_timesteps=True,
                       stepper=(name, json.dumps(config)))
        return cls.from_config(config, source=str(source))

    def new_stepper(self, num_inference_steps: int, device: torch.device | str) -> DiffusersStepper | None:
        """A request's own multistep solver (None: flow-match Euler, stepped by :func:`euler_step`)."""
        if self.stepper is None:
            return None
        return DiffusersStepper(self.stepper[0], json.loads(self.stepper[1]), num_inference_steps, device)

    def mu(self, image_seq_len: int) -> float:
        return calculate_shift(image_seq_len, self.base_image_seq_len, self.max_image_seq_len,
                               self.base_shift, self.max_shift)

    def sigmas(self, num_inference_steps: int, image_seq_len: int,
               device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """(timesteps[steps], sigmas[steps + 1]) in float32, timesteps on the 0..1000 scale."""
        if self.stepper is not None:
            st = self.new_stepper(num_inference_steps, "cpu")
            return st.timesteps.to(device), st.scheduler.sigmas.to(device=device, dtype=torch.float32)
        if self.scheduler_timesteps:
            return self._scheduler_sigmas(num_inference_steps, image_seq_len, device)
        sig = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps).astype(np.float32)
        if self.use_dynamic_shifting:
            mu = self.mu(image_seq_len)
            if self.time_shift_type == "exponential":
                sig = math.exp(mu) / (math.exp(mu) + (1 / sig - 1) ** 1.0)
            else:
                sig = mu / (mu + (1 / sig - 1) ** 1.0)
        else:
            sig = self.shift * sig / (1 + (self.shift - 1) * sig)
        if self.shift_terminal and num_inference_steps > 1:
            # (diffusers divides by zero here for a single step and samples NaNs; one step keeps sigma 1.)
            one_minus_z = 1 - sig
            scale = one_minus_z[-1] / (1 - self.shift_terminal)
            sig = 1 - (one_minus_z / scale)
        sigmas = torch.from_numpy(np.asarray(sig)).to(dtype=torch.float32, device=device)
        timesteps = sigmas * self.num_train_timesteps
        sigmas = torch.cat([sigmas, torch.zeros(1, device=sigmas.device)])
        return timesteps, sigmas

    def _scheduler_sigmas(self, steps: int, image_seq_len: int, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
        """The timesteps and sigmas of diffusers' ``FlowMatchEulerDiscreteScheduler.set_timesteps(steps)`` (no sigmas
        passed) for this config."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        scheduler = FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=self.num_train_timesteps, shift=self.shift, use_dynamic_shifting=self.use_dynamic_shifting,
            base_shift=self.base_shift, max_shift=self.max_shift, base_image_seq_len=self.base_image_seq_len,
            max_image_seq_len=self.max_image_seq_len, shift_terminal=self.shift_terminal,
            time_shift_type=self.time_shift_type)
        scheduler.set_timesteps(steps, device="cpu", mu=self.mu(image_seq_len) if self.use_dynamic_shifting else None)
        return (scheduler.timesteps.to(device=device, dtype=torch.float32),
                scheduler.sigmas.to(device=device, dtype=torch.float32))


class DiffusersStepper:
    """One request's instance of a diffusers multistep scheduler (it keeps the request's previous predictions):
    ``timesteps`` as its ``set_timesteps(steps)`` gives them, ``step(v, t, x)`` its own ``step``, which works
    element by element on the packed latents."""

    def __init__(self, class_name: str, config: dict[str, Any], steps: int, device: torch.device | str) -> None:
        import diffusers

        self.scheduler = getattr(diffusers, class_name).from_config(config)
        self.scheduler.set_timesteps(steps, device=device)
        self.scheduler.set_begin_index(0)  # as the pipelines set it (no search of the timestep in the schedule)

    @property
    def timesteps(self) -> torch.Tensor:
        return self.scheduler.timesteps

    def step(self, velocity: torch.Tensor, t: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        return self.scheduler.step(velocity, t, sample, return_dict=False)[0]


def euler_step(sample: torch.Tensor, velocity: torch.Tensor, sigma: torch.Tensor,
               sigma_next: torch.Tensor) -> torch.Tensor:
    """One flow-match Euler step in fp32, cast back to the model output dtype (as the scheduler does)."""
    dt = sigma_next - sigma
    prev = sample.to(torch.float32) + dt * velocity
    return prev.to(velocity.dtype)
