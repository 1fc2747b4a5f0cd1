"""The backbone checks: timm's feature contract (:func:`check_feature_info`), kdzoo's wrapper
(:func:`check_kdnet`), gradients (:func:`check_model_backward`), all of them on a factory or a registered
name in :func:`check_model`."""
from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch import nn

from kdzoo.models import KDNet, NetInfo
from kdzoo.testing._common import ContractError, _isolated


def _model_device(model: nn.Module) -> torch.device:
    """Where ``model``'s parameters (else buffers) are; the CPU for a module without either."""
    t = next(model.parameters(), None)
    t = t if t is not None else next(model.buffers(), None)
    return t.device if t is not None else torch.device("cpu")


def _model_fail(who: str, problem: str, fix: str) -> ContractError:
    return ContractError(f"kdzoo contract: model {who}: {problem}\n  How to fix: {fix}")


def _resolve(factory_or_name: str | Callable[..., nn.Module], registry: Any) -> tuple[str, Callable[..., nn.Module]]:
    if isinstance(factory_or_name, str):
        from kdzoo.plugins import load_plugins

        registry = registry if registry is not None else load_plugins()
        if factory_or_name not in registry.models:
            raise _model_fail(repr(factory_or_name), "no model of this name is registered",
                              "register(name, factory) in a register_models hook; check `kdzoo plugins`.")
        return repr(factory_or_name), registry.models[factory_or_name]
    return getattr(factory_or_name, "__qualname__", repr(factory_or_name)), factory_or_name


def _feature_dicts(model: nn.Module) -> list[dict]:
    info = model.feature_info
    return list(info.get_dicts() if hasattr(info, "get_dicts") else info)


@_isolated
def check_feature_info(model: nn.Module, input_size: tuple[int, int] = (32, 32), who: str = "") -> None:
    """timm's contract: ``forward_intermediates`` returns one map per ``feature_info`` entry with
    ``num_chs`` channels and about ``input / reduction`` pixels, its final output equals
    ``forward_features``, and ``forward_head`` of it equals ``forward``."""
    who = who or type(model).__name__
    entries = _feature_dicts(model)
    if not entries:
        raise _model_fail(who, "feature_info is empty", "describe each stage: dict(num_chs=C, reduction=R, module='name').")
    for i, e in enumerate(entries):
        if not {"num_chs", "reduction", "module"} <= set(e):
            raise _model_fail(who, f"feature_info[{i}] = {e} lacks num_chs, reduction or module",
                              "give every entry num_chs, reduction and module, as timm does.")
    reductions = [e["reduction"] for e in entries]
    if reductions != sorted(reductions):
        raise _model_fail(who, f"feature_info reductions {reductions} are not ordered from input to output",
                          "list the entries from input to output.")
    model.eval()
    x = torch.randn(2, 3, *input_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        final, inter = model.forward_intermediates(x)
        if len(inter) != len(entries):
            raise _model_fail(who, f"forward_intermediates returned {len(inter)} maps for {len(entries)} feature_info entries",
                              "return one intermediate per feature_info entry when indices=None.")
        for i, (e, o) in enumerate(zip(entries, inter)):
            expect = [s / e["reduction"] for s in input_size]
            if o.shape[1] != e["num_chs"] or any(abs(o.shape[2 + d] - expect[d]) > 1 for d in (0, 1)):
                raise _model_fail(who, f"intermediate {i} has shape {tuple(o.shape)}, but feature_info[{i}] says "
                                       f"num_chs={e['num_chs']}, reduction={e['reduction']} (about "
                                       f"{expect[0]:g}x{expect[1]:g} for a {input_size[0]}x{input_size[1]} input)",
                                  "make feature_info match what forward_intermediates returns.")
        if not torch.allclose(final, model.forward_features(x), rtol=1e-4, atol=1e-5):
            raise _model_fail(who, "forward_intermediates' final output differs from forward_features",
                              "return forward_features(x) as the first element of forward_intermediates.")
        only = model.forward_intermediates(x, indices=len(entries), intermediates_only=True)
        if len(only) != len(entries) or not all(torch.allclose(a, b) for a, b in zip(only, inter)):
            raise _model_fail(who, "intermediates_only=True returns other maps", "honour indices and intermediates_only.")
        if not torch.allclose(model.forward_head(final), model(x), rtol=1e-4, atol=1e-5):
            raise _model_fail(who, "forward_head(forward_features(x)) differs from forward(x)",
                              "define forward(x) as forward_head(forward_features(x)).")


@_isolated
def check_kdnet(model: nn.Module, input_size: tuple[int, int] = (32, 32), who: str = "") -> NetInfo:
    """kdzoo's wrapper can describe the model: stage features and embedding agree with the NetInfo it
    measured, stages are ordered from input to output, and the logits equal the model's own."""
    who = who or type(model).__name__
    try:
        net = KDNet(model, input_size)
    except Exception as e:
        raise _model_fail(who, f"kdzoo.models.KDNet cannot wrap it: {e}",
                          "give it timm's API (forward_intermediates, forward_head, feature_info) or stage modules as "
                          "direct children.") from e
    info = net.info
    if info.num_stages < 1:
        raise _model_fail(who, "no stage outputs were found", "expose stage modules, or implement feature_info.")
    sizes = list(info.stage_sizes)
    if any(b[0] > a[0] or b[1] > a[1] for a, b in zip(sizes, sizes[1:])):
        raise _model_fail(who, f"stage sizes {sizes} grow from input to output", "order stages from input to output.")
    net.eval()
    x = torch.randn(3, 3, *input_size, generator=torch.Generator().manual_seed(1)).to(_model_device(model))
    with torch.no_grad():
        out = net(x, features=True, embedding=info.embed_dim > 0)
        plain = model(x)
    shapes = [tuple(f.shape) for f in out.features]
    expected = [(3, c, h, w) for c, (h, w) in zip(info.stage_channels, info.stage_sizes)]
    if shapes != expected:
        raise _model_fail(who, f"stage features {shapes} on a batch of 3 differ from the NetInfo {expected}",
                          "the stage outputs must not depend on the batch size or on the call.")
    if info.embed_dim and tuple(out.embedding.shape) != (3, info.embed_dim):
        raise _model_fail(who, f"embedding shape {tuple(out.embedding.shape)} differs from (3, {info.embed_dim})",
                          "forward_head(x, pre_logits=True) must return the (B, D) vector the classifier reads.")
    if tuple(out.logits.shape) != (3, info.num_classes) or not torch.allclose(out.logits, plain, rtol=1e-4, atol=1e-5):
        raise _model_fail(who, "the logits computed with features differ from model(x)",
                          "forward_head(final) must equal forward(x), and get_classifier()(embedding) the logits.")
    return info


@_isolated
def check_model_backward(model: nn.Module, input_size: tuple[int, int] = (32, 32), who: str = "") -> None:
    """In training mode, every parameter gets a finite gradient from the logits (as timm's tests check)."""
    who = who or type(model).__name__
    model.train()
    model.zero_grad(set_to_none=True)
    x = torch.randn(2, 3, *input_size, generator=torch.Generator().manual_seed(2)).to(_model_device(model))
    model(x).float().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    if missing:
        raise _model_fail(who, f"parameters {missing[:5]}{'...' if len(missing) > 5 else ''} get no gradient",
                          "remove unused parameters: the optimiser and weight decay would still touch them.")
    bad = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    if bad:
        raise _model_fail(who, f"parameters {bad[:5]} get non-finite gradients", "check the model's numerics.")


@_isolated
def check_model(factory_or_name: str | Callable[..., nn.Module], *, registry: Any = None,
                input_size: tuple[int, int] = (32, 32), devices: Iterable[str] | None = None,
                **factory_kwargs: Any) -> NetInfo:
    """Run every model check on a factory (or a registered name); return the NetInfo it measured.

    The factory takes ``num_classes`` (checked with 10 and 7) and ``factory_kwargs``. A timm-style
    model (``forward_intermediates``, ``forward_head``, ``feature_info``) is also checked against
    timm's feature contract. The wrapper and backward checks run on every device of ``devices``
    (default: cpu, and cuda when available), the model moved there with ``.to(device)``.
    """
    devices = list(devices) if devices is not None else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    if not devices:
        raise ValueError("devices must name at least one device")
    who, factory = _resolve(factory_or_name, registry)
    torch.manual_seed(0)
    try:
        model = factory(num_classes=7, **factory_kwargs)
        seven = model.eval()(torch.zeros(2, 3, *input_size))
    except Exception as e:
        raise _model_fail(who, f"factory(num_classes=7) failed: {type(e).__name__}: {e}",
                          "accept factory(num_classes=10, pretrained=False, **kwargs) and build that many classes.") from e
    if tuple(seven.shape) != (2, 7):
        raise _model_fail(who, f"factory(num_classes=7) gives logits of shape {tuple(seven.shape)}, not (2, 7)",
                          "honour num_classes.")
    model = factory(num_classes=10, **factory_kwargs)
    if not isinstance(model, nn.Module):
        raise _model_fail(who, f"the factory returned {type(model).__name__}", "return an nn.Module.")
    if all(hasattr(model, a) for a in ("forward_intermediates", "forward_head", "feature_info")):
        check_feature_info(model, input_size, who)
    infos = []
    for device in devices:
        model.to(device)
        infos.append(check_kdnet(model, input_size, f"{who} on {device}" if device != "cpu" else who))
        check_model_backward(model, input_size, f"{who} on {device}" if device != "cpu" else who)
    if any(i != infos[0] for i in infos):
        raise _model_fail(who, f"the wrapper measured other stages on {devices}: {infos}",
                          "build the same stages whatever the device.")
    return infos[0]
