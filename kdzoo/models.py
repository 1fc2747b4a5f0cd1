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
import torch.nn.functional as F
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


def pool_to_match(f_s: torch.Tensor, f_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Adaptive-average-pool whichever of two paired maps is larger to ``(min H, min W)`` of the two."""
    size = (min(f_s.shape[2], f_t.shape[2]), min(f_s.shape[3], f_t.shape[3]))
    if tuple(f_s.shape[2:]) != size:
        f_s = F.adaptive_avg_pool2d(f_s, size)
    if tuple(f_t.shape[2:]) != size:
        f_t = F.adaptive_avg_pool2d(f_t, size)
    return f_s, f_t


def loss_dtype(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32 for a loss computation, or float64 when it already is (reference tests)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


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


def _stage_preacts(model: nn.Module, indices: list[int]) -> tuple[str, ...] | None:
    """The ``"preact"`` declarations of the stage entries, or ``None`` unless every stage entry has one."""
    entries = _feature_dicts(model)
    if not indices or not all("preact" in entries[i] for i in indices):
        return None
    names = tuple(entries[i]["preact"] for i in indices)
    for i, name in zip(indices, names):
        if not isinstance(name, str):
            raise KDZooError(
                f"{type(model).__name__}.feature_info[{i}] has preact={name!r}: it must be the dotted name of the "
                "module whose input is the stage's pre-activation output (its final activation), or \"\" when "
                "the stage output has no activation.")
        if name and not _has_submodule(model, name):
            raise KDZooError(
                f"{type(model).__name__}.feature_info[{i}] has preact={name!r}, but the model has no module of "
                "that name: name the activation that ends the stage as model.named_modules() spells it.")
    return names


def _stem_module(model: nn.Module) -> tuple[str | None, bool]:
    """The module whose output is the stem output, and whether the model declared it (``stem_module``)
    rather than KDNet taking ``feature_info[0]``; ``None`` when there is neither."""
    declared = getattr(model, "stem_module", None)
    if isinstance(declared, str):
        if not _has_submodule(model, declared):
            raise KDZooError(
                f"{type(model).__name__}.stem_module is {declared!r}, but the model has no module of that name: "
                "name the module whose output is the stem's, as model.named_modules() spells it.")
        return declared, True
    entries = _feature_dicts(model)
    name = entries[0].get("module") if entries else None
    return (name if isinstance(name, str) and _has_submodule(model, name) else None), False


def _has_submodule(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


def _is_global_pool(module: nn.Module, inp: tuple, out: torch.Tensor) -> bool:
    """A parameter-free module that squeezes a larger map to 1x1 (``AdaptiveAvgPool2d(1)`` and friends)."""
    x = inp[0] if inp else None
    return (tuple(out.shape[-2:]) == (1, 1) and isinstance(x, torch.Tensor) and x.dim() == 4
            and tuple(x.shape[-2:]) != (1, 1) and next(module.parameters(), None) is None)


class KDNet(nn.Module):
    """A backbone as the engine sees it: ``forward(x, features=False, embedding=False, preact=False,
    stem=False) -> Outputs``.

    ``.model`` is the backbone (so state_dict keys are ``model.*``), ``.info`` its :class:`NetInfo`
    for ``input_size``, measured by a dry run at construction. Features are computed only when
    requested; otherwise ``forward`` is exactly ``model(x)``.

    * timm-style models (``forward_intermediates``, ``forward_head``, ``feature_info``): the stage
      outputs are the last ``feature_info`` entry at each distinct reduction, taken with
      ``forward_intermediates(x, indices=...)``; the embedding is ``forward_head(final,
      pre_logits=True)`` and the logits are ``get_classifier()(embedding)``.

      *Pre-activation stage outputs* (``preact=True``): a stage entry may carry ``"preact":
      "<dotted module name>"``, the module whose input (first positional argument) at its last
      call in the forward pass is the stage output before its final activation: the ReLU that
      ends the stage. A forward pre-hook clones that input (the activations are usually
      in-place). ``"preact": ""`` says that the stage output has no activation and is its own
      pre-activation (MobileNetV2's linear bottlenecks). ``info.has_preact`` is True when every
      stage entry has the key. The CIFAR nets of :mod:`kdzoo_plugins.cifar_nets` declare them.

      *Stem output* (``stem=True``): the output (cloned) of the module named by the model's
      ``stem_module`` attribute when it has one (the CIFAR nets do), else by
      ``feature_info[0]["module"]``; ``info.stem_channels`` and ``info.stem_size`` are 0 and
      (0, 0) when that module does not produce a 4-D map.
    * plain ``nn.Module``: forward hooks on the model's direct children. The stage outputs are
      the last 4-D output among the direct children at each spatial size, in call order, leaving
      out global pooling (a parameter-free child that turns a larger map into 1x1). Which child
      calls these are is fixed at construction by the dry run. The embedding is the input of the
      last ``nn.Linear`` called. A child that wraps several resolutions (``features =
      nn.Sequential(...)``) counts as one output: expose the stages as direct children, or give
      the model timm's API, for finer features. Plain modules have neither pre-activation stage
      outputs nor a stem output.

    Every hook is removed when the forward pass ends, also when it fails.
    """

    def __init__(self, model: nn.Module, input_size: tuple[int, int] = (32, 32)) -> None:
        super().__init__()
        self.model = model
        self.timm_style = _is_timm_style(model)
        self._indices: list[int] = _stage_indices(model) if self.timm_style else []
        self._plan: dict[str, dict[int, int]] = {}  # plain: child name -> {call number: stage index}
        self._linear: str | None = None  # a name, not the module: an attribute would register it twice
        # timm-style only: per stage, the module whose input is its pre-activation ("" = the stage output)
        self._preact: tuple[str, ...] | None = _stage_preacts(model, self._indices) if self.timm_style else None
        self._stem, stem_declared = _stem_module(model) if self.timm_style else (None, False)
        param = next(model.parameters(), None)
        x = torch.zeros(2, 3, *input_size, device=param.device if param is not None else "cpu",
                        dtype=param.dtype if param is not None and param.is_floating_point() else torch.float32)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                if not self.timm_style:
                    self._plan, self._linear = self._plan_hooks(x)
                    out = self._run_hooked(x, True, self._linear is not None)
                else:
                    out = self._run_timm(x, True, True, self._preact is not None, self._stem is not None,
                                         dry_run=True)
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
        if self._preact is not None:
            self._check_preact(out)
        if self._stem is not None and not (isinstance(out.stem, torch.Tensor) and out.stem.dim() == 4):
            if stem_declared:
                raise KDZooError(
                    f"{type(model).__name__}.stem_module names {self._stem!r}, but "
                    + ("the forward pass never called it" if out.stem is None else
                       f"its output is not a (B, C, H, W) map (shape {tuple(out.stem.shape)})")
                    + ": name the module whose output is the stem's feature map.")
            self._stem = None  # feature_info[0] is no feature map (a transformer's tokens, say): no stem output
        stem_out = out.stem if self._stem is not None else None
        self.info = NetInfo(
            stage_channels=tuple(int(f.shape[1]) for f in out.features),
            stage_sizes=tuple((int(f.shape[-2]), int(f.shape[-1])) for f in out.features),
            embed_dim=int(out.embedding.shape[-1]) if out.embedding is not None else 0,
            num_classes=int(out.logits.shape[-1]),
            input_size=tuple(input_size),
            has_preact=self._preact is not None,
            stem_channels=int(stem_out.shape[1]) if stem_out is not None else 0,
            stem_size=(int(stem_out.shape[-2]), int(stem_out.shape[-1])) if stem_out is not None else (0, 0),
        )

    def _check_preact(self, out: Outputs) -> None:
        """At construction: every declared pre-activation was captured and has its stage's shape."""
        entries = _feature_dicts(self.model)
        for i, (name, pre, feat) in enumerate(zip(self._preact, out.preact, out.features)):
            where = f"{type(self.model).__name__}.feature_info[{self._indices[i]}] (stage {i})"
            if pre is None:
                raise KDZooError(
                    f"{where} declares preact={name!r}, but the forward pass never called that module: name the "
                    f"activation that ends the stage {entries[self._indices[i]]['module']!r}, called as a module.")
            if pre.shape != feat.shape:
                raise KDZooError(
                    f"{where} declares preact={name!r}, whose input has shape {tuple(pre.shape)}, but the stage "
                    f"output has shape {tuple(feat.shape)}: name the activation whose output is the stage output.")

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

    def forward(self, x: torch.Tensor, features: bool = False, embedding: bool = False, preact: bool = False,
                stem: bool = False) -> Outputs:
        if not (features or embedding or preact or stem):
            return Outputs(logits=self.model(x))
        if preact and self._preact is None:
            raise KDZooError(
                f"Pre-activation stage outputs of {type(self.model).__name__} were requested (the method needs "
                "them: needs_preact), but this backbone does not declare them. The CIFAR nets (resnet*, "
                "resnet50_cifar, wrn_*, vgg*, mobile_half, mobilenetv2_cifar, shufflenet_v1/v2) have them. For "
                "another timm-style backbone, give every stage entry of its feature_info a \"preact\" key: the "
                "dotted name of the activation module that ends the stage (KDNet reads its input), or \"\" when "
                "the stage output has no activation. Otherwise pick a method that needs no pre-activations.")
        if stem and self._stem is None:
            raise KDZooError(
                f"The stem output of {type(self.model).__name__} was requested (the method needs it: needs_stem), "
                "but KDNet found none: it takes the output of the module named by the model's stem_module "
                "attribute, else by feature_info[0]['module'] of a timm-style backbone, which must be a (B, C, H, W) "
                "map. Set model.stem_module to the stem's module name, or pick a method that needs no stem output.")
        if self.timm_style:
            return self._run_timm(x, features, embedding, preact, stem)
        return self._run_hooked(x, features, embedding)

    def _run_timm(self, x: torch.Tensor, features: bool, embedding: bool, preact: bool = False, stem: bool = False,
                  dry_run: bool = False) -> Outputs:
        model = self.model
        n = len(self._indices)
        pre: list[torch.Tensor | None] = [None] * n
        stem_out: list[torch.Tensor] = []
        handles = []
        if preact:
            for i, name in enumerate(self._preact):
                if name:
                    def capture(module, inp, i=i):
                        pre[i] = inp[0].clone()  # the activation may be in-place: keep its input as it was
                    handles.append(model.get_submodule(name).register_forward_pre_hook(capture))
        if stem:
            handles.append(model.get_submodule(self._stem).register_forward_hook(
                lambda module, inp, out: stem_out.append(out.clone() if isinstance(out, torch.Tensor) else out)))
        try:
            if features or (preact and "" in self._preact):
                final, feats = model.forward_intermediates(x, indices=self._indices)
            else:
                final, feats = model.forward_features(x), None
            if embedding:
                emb = model.forward_head(final, pre_logits=True)
                head = model.get_classifier()
                logits = head(emb) if isinstance(head, nn.Module) else model.forward_head(final)
            else:
                emb, logits = None, model.forward_head(final)
        finally:
            for h in handles:
                h.remove()
        if preact:
            pre = [feats[i] if name == "" else p for i, (name, p) in enumerate(zip(self._preact, pre))]
            if not dry_run and any(p is None for p in pre):
                missing = [name for name, p in zip(self._preact, pre) if p is None]
                raise KDZooError(f"The pre-activation modules {missing} of {type(model).__name__} were not called in "
                                 "this forward pass: check the feature_info \"preact\" names.")
        return Outputs(logits=logits, features=feats if features else None, embedding=emb,
                       preact=pre if preact else None, stem=(stem_out[-1] if stem_out else None) if stem else None)

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
