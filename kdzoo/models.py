"""Backbones as the engine sees them: logits, stage features and the pooled embedding.

Terms used across kdzoo:

* **stage outputs**: the feature maps at the end of each resolution stage, ordered from input
  to output, post-activation. A timm model's stages come from its ``feature_info``; when
  several entries share one reduction, the last of them is the stage output.
* **embedding**: the pooled pre-logit vector, ``forward_head(x, pre_logits=True)``.

Stage pairing rule (``pair_stages``), used by feature methods when teacher and student differ:

1. stages whose spatial sizes are equal are paired (each resolution is one stage per net);
2. if no size is shared, stages are aligned from the last one: (t[-1], s[-1]), (t[-2], s[-2]), ...
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kdzoo import KDZooError


@dataclass(frozen=True)
class NetInfo:
    """A description of one network, from which a method is built.

    ``stage_sizes`` are ``(H, W)`` of each stage output for an input of ``input_size``.
    """

    stage_channels: tuple[int, ...]
    stage_sizes: tuple[tuple[int, int], ...]
    embed_dim: int
    num_classes: int
    input_size: tuple[int, int] = (32, 32)

    @property
    def num_stages(self) -> int:
        return len(self.stage_channels)


@dataclass
class Outputs:
    """What a network produced for one batch. ``features``/``embedding`` are ``None`` unless asked for."""

    logits: torch.Tensor
    features: list[torch.Tensor] | None = None
    embedding: torch.Tensor | None = None
    extras: dict = field(default_factory=dict)


def pair_stages(teacher: NetInfo, student: NetInfo) -> list[tuple[int, int]]:
    """Pair teacher and student stages; returns ``[(teacher_index, student_index), ...]`` from input to output.

    See the module docstring for the rule. Raises ``KDZooError`` if either net has no stage.
    """
    if not teacher.num_stages or not student.num_stages:
        raise KDZooError(
            "Cannot pair feature stages: the "
            + ("teacher" if not teacher.num_stages else "student")
            + " reports no stage outputs. Feature methods (fitnets, attention) need a backbone "
            "with feature_info or recognisable stages; use a logit or embedding method instead."
        )
    t_by_size = {size: i for i, size in enumerate(teacher.stage_sizes)}
    shared = [(t_by_size[size], j) for j, size in enumerate(student.stage_sizes) if size in t_by_size]
    if shared:
        return shared
    n = min(teacher.num_stages, student.num_stages)
    return [(teacher.num_stages - n + k, student.num_stages - n + k) for k in range(n)]
