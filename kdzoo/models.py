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

from dataclasses import dataclass

import torch
from torch import nn

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
    has_preact: bool = False  # the backbone declares its pre-activation stage outputs (Outputs.preact)
    stem_channels: int = 0  # channels of Outputs.stem; 0: no stem output
    stem_size: tuple[int, int] = (0, 0)

    @property
    def num_stages(self) -> int:
        return len(self.stage_channels)


@dataclass
class Outputs:
    """What a network produced for one batch. Everything but ``logits`` is ``None`` unless asked for.

    ``preact[i]`` is stage ``i``'s output before its final activation (``features[i]`` is that
    activation of it); ``stem`` is the stem's output (the first ``feature_info`` entry)."""

    logits: torch.Tensor
    features: list[torch.Tensor] | None = None
    embedding: torch.Tensor | None = None
    preact: list[torch.Tensor] | None = None
    stem: torch.Tensor | None = None


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


# --------------------------------------------------------------------------- the wrapper the engine uses


def _is_timm_style(model: nn.Module) -> bool:
    return all(hasattr(model, a) for a in ("forward_intermediates", "forward_head", "feature_info"))


def _feature_dicts(model: nn.Module) -> list[dict]:
    info = model.feature_info
    return list(info.get_dicts() if hasattr(info, "get_dicts") else info)


def _stage_indices(model: nn.Module) -> list[int]:
    """Indices into ``feature_info`` of the last entry at each distinct reduction, input to output."""
    last: dict[int, int] = {}
    for i, entry in enumerate(_feature_dicts(model)):
        last[entry["reduction"]] = i
    return sorted(last.values())


def _is_global_pool(module: nn.Module, inp: tuple, out: torch.Tensor) -> bool:
    """A parameter-free module that squeezes a larger map to 1x1 (``AdaptiveAvgPool2d(1)`` and friends)."""
    x = inp[0] if inp else None
    return (tuple(out.shape[-2:]) == (1, 1) and isinstance(x, torch.Tensor) and x.dim() == 4
            and tuple(x.shape[-2:]) != (1, 1) and next(module.parameters(), None) is None)


class KDNet(nn.Module):
    """A backbone as the engine sees it: ``forward(x, features=False, embedding=False) -> Outputs``.

    ``.model`` is the backbone (so state_dict keys are ``model.*``), ``.info`` its :class:`NetInfo`
    for ``input_size``, measured by a dry run at construction. Features are computed only when
    requested; otherwise ``forward`` is exactly ``model(x)``.

    * timm-style models (``forward_intermediates``, ``forward_head``, ``feature_info``): the stage
      outputs are the last ``feature_info`` entry at each distinct reduction, taken with
      ``forward_intermediates(x, indices=...)``; the embedding is ``forward_head(final,
      pre_logits=True)`` and the logits are ``get_classifier()(embedding)``.
    * plain ``nn.Module``: forward hooks on the model's direct children. The stage outputs are
      the last 4-D output among the direct children at each spatial size, in call order, leaving
      out global pooling (a parameter-free child that turns a larger map into 1x1). Which child
      calls these are is fixed at construction by the dry run. The embedding is the input of the
      last ``nn.Linear`` called. A child that wraps several resolutions (``features =
      nn.Sequential(...)``) counts as one output: expose the stages as direct children, or give
      the model timm's API, for finer features.
    """

    def __init__(self, model: nn.Module, input_size: tuple[int, int] = (32, 32)) -> None:
        super().__init__()
        self.model = model
        self.timm_style = _is_timm_style(model)
        self._indices: list[int] = _stage_indices(model) if self.timm_style else []
        self._plan: dict[str, dict[int, int]] = {}  # plain: child name -> {call number: stage index}
        self._linear: str | None = None  # a name, not the module: an attribute would register it twice
        param = next(model.parameters(), None)
        x = torch.zeros(2, 3, *input_size, device=param.device if param is not None else "cpu",
                        dtype=param.dtype if param is not None and param.is_floating_point() else torch.float32)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                if not self.timm_style:
                    self._plan, self._linear = self._plan_hooks(x)
                out = self.forward(x, features=True, embedding=self._linear is not None or self.timm_style)
        except KDZooError:
            raise
        except Exception as exc:
            raise KDZooError(
                f"{type(model).__name__} failed on a batch of {input_size[0]}x{input_size[1]} images "
                f"({type(exc).__name__}: {exc}). The model may need another input size: give the "
                "backbone one that matches the data (many timm models take img_size=...), or use "
                "a model built for this resolution."
            ) from exc
        finally:
            model.train(was_training)
        self.info = NetInfo(
            stage_channels=tuple(int(f.shape[1]) for f in out.features),
            stage_sizes=tuple((int(f.shape[-2]), int(f.shape[-1])) for f in out.features),
            embed_dim=int(out.embedding.shape[-1]) if out.embedding is not None else 0,
            num_classes=int(out.logits.shape[-1]),
            input_size=tuple(input_size),
        )

    def _plan_hooks(self, x: torch.Tensor) -> tuple[dict[str, dict[int, int]], str | None]:
        calls: list[tuple[str, int, tuple[int, int]]] = []
        counts: dict[str, int] = {}
        linears: list[str] = []

        def child_hook(name: str):
            def hook(module, inp, out):
                n = counts[name] = counts.get(name, 0) + 1
                if isinstance(out, torch.Tensor) and out.dim() == 4 and not _is_global_pool(module, inp, out):
                    calls.append((name, n - 1, tuple(out.shape[-2:])))
            return hook

        handles = [child.register_forward_hook(child_hook(name)) for name, child in self.model.named_children()]
        handles += [m.register_forward_pre_hook(lambda m, inp, name=name: linears.append(name))
                    for name, m in self.model.named_modules() if isinstance(m, nn.Linear)]
        try:
            self.model(x)
        finally:
            for h in handles:
                h.remove()
        last_at_size: dict[tuple[int, int], tuple[int, str, int]] = {}
        for pos, (name, n, size) in enumerate(calls):
            last_at_size[size] = (pos, name, n)
        plan: dict[str, dict[int, int]] = {}
        for stage, (_, name, n) in enumerate(sorted(last_at_size.values())):
            plan.setdefault(name, {})[n] = stage
        return plan, (linears[-1] if linears else None)

    def forward(self, x: torch.Tensor, features: bool = False, embedding: bool = False) -> Outputs:
        if not (features or embedding):
            return Outputs(logits=self.model(x))
        if self.timm_style:
            return self._run_timm(x, features, embedding)
        return self._run_hooked(x, features, embedding)

    def _run_timm(self, x: torch.Tensor, features: bool, embedding: bool) -> Outputs:
        model = self.model
        if features:
            final, feats = model.forward_intermediates(x, indices=self._indices)
        else:
            final, feats = model.forward_features(x), None
        if not embedding:
            return Outputs(logits=model.forward_head(final), features=feats)
        emb = model.forward_head(final, pre_logits=True)
        head = model.get_classifier()
        logits = head(emb) if isinstance(head, nn.Module) else model.forward_head(final)
        return Outputs(logits=logits, features=feats, embedding=emb)

    def _run_hooked(self, x: torch.Tensor, features: bool, embedding: bool) -> Outputs:
        if embedding and self._linear is None:
            raise KDZooError(
                f"The embedding of {type(self.model).__name__} was requested, but it has no nn.Linear "
                "whose input could serve as one. Use a method that needs no embedding, or give the "
                "model timm's forward_head(x, pre_logits=True)."
            )
        feats: list[torch.Tensor | None] = [None] * sum(len(calls) for calls in self._plan.values())
        counts: dict[str, int] = {}
        emb: list[torch.Tensor] = []
        handles = []
        if features:
            def child_hook(name: str):
                def hook(module, inp, out):
                    n = counts[name] = counts.get(name, 0) + 1
                    stage = self._plan[name].get(n - 1)
                    if stage is not None:
                        feats[stage] = out
                return hook
            handles += [getattr(self.model, name).register_forward_hook(child_hook(name)) for name in self._plan]
        if embedding:
            linear = self.model.get_submodule(self._linear)
            handles.append(linear.register_forward_pre_hook(lambda m, inp: emb.append(inp[0])))
        try:
            logits = self.model(x)
        finally:
            for h in handles:
                h.remove()
        return Outputs(logits=logits, features=feats if features else None, embedding=emb[-1] if embedding else None)


def describe(model: nn.Module, input_size: tuple[int, int] = (32, 32)) -> NetInfo:
    """The :class:`NetInfo` of ``model`` for ``input_size`` inputs, from a dry forward of two images
    in eval mode under ``no_grad`` (the training mode is restored). Stages as in :class:`KDNet`."""
    return KDNet(model, input_size).info
