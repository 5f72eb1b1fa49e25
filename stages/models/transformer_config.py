"""Reading a diffusers transformer ``config.json`` into a family's config dataclass, the same way for every family
(:func:`config_from_dict`, :class:`TransformerConfig`)."""

from __future__ import annotations

import logging
from dataclasses import fields
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from omni_runtime.stages.errors import CheckpointError

logger = logging.getLogger(__name__)

C = TypeVar("C")


def config_from_dict(cls: type[C], config: dict[str, Any], source: str | Path, class_name: str) -> C:
    """``cls`` (a dataclass with a ``validate(source)`` method) from a config dict: unknown keys are logged and
    ignored, as diffusers does; ``axes_dims_rope`` becomes a tuple of integers; then ``validate`` runs."""
    known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(k for k in config if k not in known and not k.startswith("_"))
    if unknown:
        logger.warning("%s: ignoring unknown %s config keys %s", source, class_name, unknown)
    values = {k: v for k, v in config.items() if k in known}
    if "axes_dims_rope" in values:
        axes = values["axes_dims_rope"]
        if not isinstance(axes, (list, tuple)) or not all(isinstance(d, int) for d in axes):
            raise CheckpointError(f"{source}: axes_dims_rope={axes!r}; expected a list of even integers summing "
                                  f"to attention_head_dim")
        values["axes_dims_rope"] = tuple(axes)
    cfg = cls(**values)
    cfg.validate(source)  # type: ignore[attr-defined]
    return cfg


class TransformerConfig:
    """What every family's config dataclass shares (a subclass declares its fields, ``class_name`` and
    ``validate``): :meth:`from_dict` and the dims derived from the diffusers keys all families have."""

    #: the diffusers class the config.json is of (its ``_class_name``)
    class_name: ClassVar[str]
    num_attention_heads: int
    attention_head_dim: int
    in_channels: int
    out_channels: int | None

    @classmethod
    def from_dict(cls: type[C], config: dict[str, Any], source: str | Path = "config") -> C:
        """Build from a config dict; unknown keys are logged and ignored, like diffusers does."""
        return config_from_dict(cls, config, source, cls.class_name)  # type: ignore[attr-defined]

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def output_channels(self) -> int:
        """The channels of one latent pixel the model predicts (``out_channels``, else ``in_channels``)."""
        return self.out_channels or self.in_channels
