"""Shared ground of the checks: :class:`ContractError`, the isolation every public check runs under,
the synthetic teacher/student pairs (:data:`NETINFO_PAIRS`) and the random inputs the method checks feed
(:func:`make_outputs`, :func:`make_labels`, :func:`make_train_labels`)."""
from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import nn

from kdzoo.models import NetInfo, Outputs

BATCH = 4
EPOCHS = 10  # the schedule the checks pretend to train for; terms are checked at the first and last epoch
TRAIN_SET = 64  # samples in the synthetic training set (bind_train_set, indices); at least one per class
IMAGE_SIZE = (32, 32)  # input size of the real networks of ``nets=``
# Outputs fields, what the messages call them, and the flag that asks the engine for them.
_FIELDS = (("features", "stage features", "needs_features"), ("embedding", "embedding", "needs_embedding"),
           ("preact", "pre-activation stage outputs", "needs_preact"), ("stem", "stem output", "needs_stem"))


class ContractError(AssertionError):
    """A plugin breaks the kdzoo contract. The message names the problem and the fix."""


def _isolated(fn: Callable) -> Callable:
    """Run a check without touching the caller's RNG state (the checks seed torch themselves); with
    one intra-op thread, the fastest for tiny tensors and immune to a busy machine (two threads
    spinning on a shared 2-core box made a 1-second check take a minute); and with denormals
    flushed to zero (an untrained deep net in eval mode produces them, and they are slow on CPUs).
    Everything is restored afterwards, the CUDA generators too where there is a GPU (``manual_seed``
    seeds them, and checks on ``cuda`` draw from them)."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with contextlib.ExitStack() as stack:
            cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
            stack.enter_context(torch.random.fork_rng(devices=cuda))
            stack.callback(torch.set_num_threads, torch.get_num_threads())
            torch.set_num_threads(1)
            if torch.set_flush_denormal(True):
                stack.callback(torch.set_flush_denormal, False)
            return fn(*args, **kwargs)
    return wrapper


def _info(channels: Iterable[int], sizes: Iterable[int], embed_dim: int) -> NetInfo:
    """A synthetic net with pre-activation outputs and a stem shaped like its first stage."""
    channels, sizes = tuple(channels), tuple(sizes)
    return NetInfo(stage_channels=channels, stage_sizes=tuple((s, s) for s in sizes),
                   embed_dim=embed_dim, num_classes=10, input_size=(32, 32), has_preact=True,
                   stem_channels=channels[0], stem_size=(sizes[0], sizes[0]))


_STUDENT = _info((8, 16, 32), (16, 8, 4), 32)

#: Teacher/student pairs every method should build for: name -> (student, teacher).
NETINFO_PAIRS: dict[str, tuple[NetInfo, NetInfo]] = {
    "identical nets": (_STUDENT, _STUDENT),
    "wider teacher": (_STUDENT, _info((16, 32, 64), (16, 8, 4), 64)),
    "deeper teacher (4 stages vs 3)": (_STUDENT, _info((8, 16, 32, 64), (32, 16, 8, 4), 64)),
    "shallower teacher (2 stages vs 3)": (_STUDENT, _info((32, 64), (8, 4), 64)),
    "deeper student (4 stages vs 3)": (_info((8, 16, 32, 64), (32, 16, 8, 4), 64), _info((16, 32, 64), (16, 8, 4), 64)),
    "no shared spatial size": (_STUDENT, _info((16, 32, 64), (12, 6, 3), 48)),
}
Pairs = Mapping[str, tuple[NetInfo, NetInfo]]
#: Real networks to check a method on: name -> (student factory, teacher factory), each returning a
#: timm-style model (``timm.create_model(...)``) or any module :class:`kdzoo.models.KDNet` wraps.
Nets = Mapping[str, tuple[Callable[[], nn.Module], Callable[[], nn.Module]]]


def _method_fail(cls: type, problem: str, fix: str) -> ContractError:
    """A failure of the class as a whole (not of one pair)."""
    who = f"method '{getattr(cls, 'name', '?')}' ({cls.__module__}.{cls.__qualname__})" if isinstance(cls, type) else repr(cls)
    return ContractError(f"kdzoo contract: {who}: {problem}\n  How to fix: {fix}")


# --------------------------------------------------------------------------- inputs


def _as_leaves(out: Outputs, requires_grad: bool = False, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu") -> Outputs:
    """A copy of ``out`` whose tensors are fresh leaves (``.grad`` shows what reached each one)."""
    def leaf(t: torch.Tensor | None) -> torch.Tensor | None:
        if t is None:
            return None
        return t.detach().to(device=device, dtype=dtype, copy=True).requires_grad_(requires_grad)

    return Outputs(logits=leaf(out.logits),
                   features=[leaf(f) for f in out.features] if out.features is not None else None,
                   embedding=leaf(out.embedding),
                   preact=[leaf(p) for p in out.preact] if out.preact is not None else None,
                   stem=leaf(out.stem))


def make_outputs(info: NetInfo, *, batch: int = BATCH, seed: int = 0, features: bool = False,
                 embedding: bool = False, preact: bool = False, stem: bool = False, requires_grad: bool = False,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> Outputs:
    """Random ``Outputs`` shaped like ``info``: logits ``(B, classes)``, stage pre-activations
    ``(B, C, H, W)`` with negative values, stage features (their ReLU), a post-ReLU embedding ``(B, D)``
    and a post-ReLU stem ``(B, stem_channels, *stem_size)``; each only when asked. With
    ``requires_grad`` every tensor is a leaf whose ``.grad`` shows what reached it (``features[i]``
    equals ``preact[i].relu()`` but is a leaf of its own, so each shows its own gradient)."""
    if preact and not info.has_preact:
        raise ValueError(f"make_outputs(preact=True): this NetInfo has no pre-activation outputs (has_preact=False): {info}")
    if stem and not info.stem_channels:
        raise ValueError(f"make_outputs(stem=True): this NetInfo has no stem output (stem_channels=0): {info}")
    g = torch.Generator().manual_seed(seed)
    logits = 2 * torch.randn(batch, info.num_classes, generator=g)
    pre = ([torch.randn(batch, c, h, w, generator=g) for c, (h, w) in zip(info.stage_channels, info.stage_sizes)]
           if features or preact else None)
    emb = torch.randn(batch, info.embed_dim, generator=g).relu() if embedding else None
    st = torch.randn(batch, info.stem_channels, *info.stem_size, generator=g).relu() if stem else None
    out = Outputs(logits=logits, features=[p.relu() for p in pre] if features else None, embedding=emb,
                  preact=pre if preact else None, stem=st)
    return _as_leaves(out, requires_grad, dtype, device)


def make_labels(info: NetInfo, *, batch: int = BATCH, seed: int = 0, device: str | torch.device = "cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 1000)
    return torch.randint(info.num_classes, (batch,), generator=g).to(device)


def make_train_labels(num_classes: int, size: int = TRAIN_SET) -> torch.Tensor:
    """What ``bind_train_set`` gets in the checks: ``max(size, num_classes)`` int64 labels in a fixed
    shuffled order, every class present."""
    n = max(size, num_classes)
    return (torch.arange(n) % num_classes)[torch.randperm(n, generator=torch.Generator().manual_seed(7))]
