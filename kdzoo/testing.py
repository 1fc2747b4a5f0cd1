"""Contract checks for kdzoo plugins, for plugin authors' own test suites.

Every check runs on tiny random tensors on the CPU (and on CUDA when there is one) and raises
:class:`ContractError`, an ``AssertionError``, whose message says what the author must fix::

    from kdzoo.testing import check_method, check_model

    def test_my_method_follows_the_contract():
        check_method(MyMethod)               # every method check, several teacher/student pairs

    def test_my_backbone_follows_the_contract():
        check_model(my_factory)              # or a registered name: check_model("resnet20")

The method checks run on synthetic teacher/student pairs (:data:`NETINFO_PAIRS`: random outputs
shaped as a ``NetInfo`` says) and, with ``nets={name: (student_factory, teacher_factory)}``, on
real networks too: a method with ``needs_teacher_net`` needs them, since ``bind_teacher`` gets the
teacher network. They bind a method as ``kdzoo.runner.build_method`` does (``bind_teacher``, then
``bind_train_set`` with :data:`TRAIN_SET` synthetic labels) and call it as the engine does
(``indices=`` for ``needs_indices``). A pair whose construction raises
:class:`~kdzoo.methods.PairNotSupported` is skipped: the method declares it cannot serve it.

Installing kdzoo gives every test suite the fixtures ``kdzoo_registry``, ``kdzoo_check_method``,
``kdzoo_check_model`` and ``kdzoo_netinfo_pairs``, from the pytest plugin :mod:`kdzoo.pytest_plugin`
(entry point ``pytest11``, name ``kdzoo``), which imports this module only when a test uses one: a
pytest run that uses none never imports torch. The individual checks are public too, for
an author who needs only some of them (``check_declaration``, ``check_hparams``,
``check_terms``, ``check_gradients``, ``check_state_dict``, ``check_determinism``,
``check_dtypes_and_devices``, ``check_init_stage``, ``check_teacher_net``, ``check_indices``,
``check_pair_defaults``; ``check_feature_info``, ``check_kdnet``, ``check_model_backward``).
"""
from __future__ import annotations

import contextlib
import functools
import io
import math
from typing import Any, Callable, Iterable, Mapping

import torch
import yaml
from torch import nn

from kdzoo import KDZooError
from kdzoo.config import parse_assignment
from kdzoo.methods import FAMILIES, INIT_STAGE_DEFAULTS, Method, PairNotSupported, coerce_hparams
from kdzoo.models import KDNet, NetInfo, Outputs

# Loss-weight names that mean different things in different papers (RepDistiller's alpha is the
# KD weight, the seed article's alpha is the CE weight, DKD's alpha/beta weigh TCKD/NCKD).
AMBIGUOUS_NAMES = frozenset({"alpha", "beta"})
BATCH = 4
EPOCHS = 10  # the schedule the checks pretend to train for; terms are checked at the first and last epoch
TRAIN_SET = 64  # samples in the synthetic training set (bind_train_set, indices); at least one per class
IMAGE_SIZE = (32, 32)  # input size of the real networks of ``nets=``
_FLAGS = ("needs_teacher", "needs_features", "needs_embedding", "needs_preact", "needs_stem", "needs_indices",
          "needs_train_labels", "needs_teacher_net", "has_init_stage", "init_uses_student")
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


def _snapshot(net: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, bool], dict[str, bool]]:
    """The teacher's state_dict (copied), its parameters' requires_grad flags and its modules' modes."""
    return ({k: v.detach().clone() for k, v in net.state_dict().items()},
            {n: p.requires_grad for n, p in net.named_parameters()},
            {n: m.training for n, m in net.named_modules()})


class _StandInStudent(nn.Module):
    """What ``init_parameters`` gets on synthetic pairs (no network there): a body and a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(2, 2)
        self.fc = nn.Linear(2, 2)

    def get_classifier(self) -> nn.Module:
        return self.fc


class _Case:
    """One method class, one teacher/student pair and fixed hyperparameters: builds, binds and calls it."""

    real = False  # a pair of real networks (_NetCase)
    student_net: KDNet | None = None
    teacher_net: KDNet | None = None

    def __init__(self, cls: type[Method], student: NetInfo, teacher: NetInfo | None, pair: str,
                 hparams: dict[str, Any]) -> None:
        self.cls, self.student, self.pair, self.hparams = cls, student, pair, dict(hparams)
        self.teacher = teacher if cls.needs_teacher else None
        self.where = f"method '{cls.name}' ({cls.__module__}.{cls.__qualname__}), pair '{pair}'"
        self.train_labels = make_train_labels(student.num_classes)
        self.unsupported = ""  # PairNotSupported's message, once supported() found it

    def fail(self, problem: str, fix: str) -> ContractError:
        return ContractError(f"kdzoo contract: {self.where}: {problem}\n  How to fix: {fix}")

    def supported(self) -> bool:
        """False when constructing or binding the method raises PairNotSupported for this pair; other
        errors are left to ``build``, which reports them."""
        torch.manual_seed(0)
        try:
            self._bind(self.cls(self.student, self.teacher, **self.hparams))
        except PairNotSupported as e:
            self.unsupported = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            return False
        except ContractError:
            raise
        except Exception:
            return True
        return True

    def _bind(self, method: Method) -> None:
        """Bind like ``kdzoo.runner.build_method``: the teacher network, then the training labels."""
        if self.cls.needs_teacher_net:
            if self.teacher_net is None:  # _cases refuses this; a guard for direct use
                raise ValueError("needs_teacher_net: this pair has no teacher network (pass nets=)")
            self._bind_teacher(method)
        if self.cls.needs_train_labels:
            method.bind_train_set(self.train_labels.clone())

    def _bind_teacher(self, method: Method) -> None:
        """``bind_teacher(net)``, then: the teacher is unchanged (state, flags, modes)."""
        before = _snapshot(self.teacher_net)
        method.bind_teacher(self.teacher_net)
        _teacher_unchanged(self, before, "in bind_teacher(net)")

    def build(self, seed: int = 0, epoch: int | None = EPOCHS - 1, what: str = "", allow_unsupported: bool = False,
              **extra: Any) -> Method:
        """Construct (``extra`` over the case's hparams), bind, and start ``epoch`` (None: no start_epoch,
        as in the init stage). ``allow_unsupported`` lets PairNotSupported through."""
        torch.manual_seed(seed)
        ctx = f" ({what})" if what else ""
        step = "construction"
        try:
            method = self.cls(self.student, self.teacher, **{**self.hparams, **extra})
            if isinstance(method, Method):
                step = "bind_teacher(net)"
                if self.cls.needs_teacher_net:
                    self._bind_teacher(method)
                step = "bind_train_set(labels)"
                if self.cls.needs_train_labels:
                    method.bind_train_set(self.train_labels.clone())
        except KDZooError as e:
            if allow_unsupported and isinstance(e, PairNotSupported):
                raise
            if step == "bind_train_set(labels)":
                raise self.fail(
                    f"bind_train_set(labels) refused the checks' training set{ctx}: {e}",
                    f"the checks bind a synthetic training set of {len(self.train_labels)} samples over "
                    f"{self.student.num_classes} classes (kdzoo.testing.TRAIN_SET): pass hyperparameters that fit "
                    f"it to the check, e.g. check_method({self.cls.__name__}, <hparam>=<smaller value>).",
                ) from e
            raise self.fail(
                f"{step} refused this pair{ctx}: {e}",
                "support this kind of teacher/student pair (see kdzoo.models.pair_stages for the "
                "stage-pairing rule); if the method cannot serve it by design, raise "
                "kdzoo.methods.PairNotSupported (the checks then skip the pair), or pass the pairs it supports: "
                "check_method(cls, pairs={...}).",
            ) from e
        except ContractError:
            raise
        except Exception as e:
            fixes = {
                "construction": "__init__(self, student, teacher=None, **hparams) must call "
                                "super().__init__(student, teacher, **hparams) and build its submodules from the "
                                "NetInfo descriptions (stage_channels, stage_sizes, embed_dim, num_classes, "
                                "has_preact, stem_channels, stem_size).",
                "bind_teacher(net)": "bind_teacher(net) gets the teacher as a kdzoo.models.KDNet in eval mode "
                                     "(net.model is the backbone, net.info its NetInfo); derive buffers from it "
                                     "under torch.no_grad() and register them with register_buffer.",
                "bind_train_set(labels)": "bind_train_set(labels) gets an int64 CPU tensor with the label of every "
                                          "training sample (len(labels) of them, in the order of the indices forward "
                                          "receives); size memory banks by it.",
            }
            raise self.fail(f"{step} raised {type(e).__name__}: {e}{ctx}", fixes[step]) from e
        if not isinstance(method, Method):
            raise self.fail(f"construction returned {type(method).__name__}", "subclass kdzoo.methods.Method.")
        if epoch is not None:
            method.start_epoch(epoch, EPOCHS)
        return method

    def outputs(self, seed: int, requires_grad: bool, dtype: torch.dtype,
                device: str | torch.device) -> tuple[Outputs, Outputs | None]:
        flags = {field: getattr(self.cls, flag) for field, _, flag in _FIELDS}
        kw = dict(requires_grad=requires_grad, dtype=dtype, device=device, **flags)
        s = make_outputs(self.student, seed=seed, **kw)
        t = make_outputs(self.teacher, seed=seed + 1, **kw) if self.teacher is not None else None
        return s, t

    def batch_indices(self, seed: int = 0) -> torch.Tensor:
        """A random batch of training-set indices (distinct, in ``range(len(train_labels))``)."""
        g = torch.Generator().manual_seed(seed + 2000)
        return torch.randperm(len(self.train_labels), generator=g)[:BATCH]

    def inputs(self, seed: int = 0, requires_grad: bool = False, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu", indices: torch.Tensor | None = None
               ) -> tuple[Outputs, Outputs | None, torch.Tensor, torch.Tensor]:
        """Student and teacher outputs, labels and training-set indices of one batch. The labels are
        those of the indices in the bound training set when the method asks for the training labels."""
        s, t = self.outputs(seed, requires_grad, dtype, device)
        idx = self.batch_indices(seed) if indices is None else indices.cpu()
        y = self.train_labels[idx] if self.cls.needs_train_labels else make_labels(self.student, seed=seed)
        return s, t, y.to(device), idx.to(device)

    def call(self, method: Method, s: Outputs | None, t: Outputs | None, y: torch.Tensor, idx: torch.Tensor,
             seed: int = 0, what: str = "", init: bool = False, hint: str = "") -> dict[str, torch.Tensor]:
        """``forward`` (or ``init_forward``) as the engine calls it (``kdzoo.engine.call_method``)."""
        from kdzoo.engine import call_method

        fn_name = "init_forward()" if init else "forward()"
        torch.manual_seed(seed)
        try:
            terms = call_method(method, method.init_forward if init else method, s, t, y, idx)
        except Exception as e:
            text = str(e)
            if not hint and "indices" in text:
                hint = ("declare needs_indices = True and accept forward(student, teacher, labels, indices) (and "
                        "init_forward likewise): the engine passes indices= only to methods that declare it.")
            elif not hint and "None" in text:
                hint = ("the engine passes features, embedding, preact and stem only when the method declares "
                        "needs_features=True, needs_embedding=True, needs_preact=True or needs_stem=True, "
                        "teacher=None when needs_teacher=False, and student=None to init_forward when "
                        "init_uses_student=False; declare what the method reads.")
            elif not hint:
                hint = (f"{fn_name[:-2]}(student, teacher, labels) must work on any batch of Outputs shaped as the "
                        "NetInfo descriptions say.")
            raise self.fail(f"{fn_name} raised {type(e).__name__}: {e}{f' ({what})' if what else ''}", hint) from e
        self.validate(terms, what, fn_name, require_ce=not init)
        return terms

    def validate(self, terms: Any, what: str = "", fn_name: str = "forward()", require_ce: bool = True) -> None:
        ctx = f" ({what})" if what else ""
        example = "return {'ce': self.w_ce * self.ce(student.logits, labels), 'kd': self.w_kd * kd}"
        if not isinstance(terms, dict) or not terms:
            raise self.fail(f"{fn_name} returned {type(terms).__name__}, not a non-empty dict of loss terms{ctx}",
                            f"return a dict of named, already weighted scalar terms: {example}.")
        for name, value in terms.items():
            if not isinstance(name, str):
                raise self.fail(f"loss term key {name!r} is not a string{ctx}", "name each term with a string.")
            if not isinstance(value, torch.Tensor):
                raise self.fail(f"loss term {name!r} is a {type(value).__name__}, not a tensor{ctx}",
                                "return torch tensors so that gradients flow (no .item(), no Python floats).")
            if value.ndim != 0:
                raise self.fail(f"loss term {name!r} has shape {tuple(value.shape)}, not a scalar{ctx}",
                                "reduce each term to a scalar (e.g. .mean() over the batch) before returning it.")
            if not value.is_floating_point():
                raise self.fail(f"loss term {name!r} has dtype {value.dtype}{ctx}", "return floating-point terms.")
            if not torch.isfinite(value):
                raise self.fail(f"loss term {name!r} is {value.item()} for random inputs{ctx}",
                                "guard logs, divisions and square roots (clamp, eps) so every term stays finite.")
        if require_ce and "ce" not in terms:
            raise self.fail(f"forward() returned {sorted(terms)}, without the cross-entropy term 'ce'{ctx}",
                            f"every method returns the label cross-entropy weighted by w_ce, so its recipe is "
                            f"explicit: {example}.")


def _kdnet(factory: Callable[[], nn.Module], name: str, role: str) -> KDNet:
    try:
        model = factory()
    except Exception as e:
        raise ValueError(f"nets[{name!r}]: the {role} factory raised {type(e).__name__}: {e}") from e
    if isinstance(model, KDNet):
        return model
    if not isinstance(model, nn.Module):
        raise ValueError(f"nets[{name!r}]: the {role} factory returned {type(model).__name__}, not an nn.Module")
    try:
        return KDNet(model, IMAGE_SIZE)
    except Exception as e:
        raise ValueError(f"nets[{name!r}]: kdzoo.models.KDNet cannot wrap the {role} "
                         f"({type(model).__name__}): {e}; check it with kdzoo.testing.check_model") from e


class _NetCase(_Case):
    """A pair of real networks: NetInfo measured by KDNet, outputs from forwards of random images (the
    student in train mode, the teacher in eval mode under inference mode, as the engine runs them), and
    the teacher KDNet (eval mode, requires_grad off, as kdzoo loads teachers) for ``bind_teacher``."""

    real = True

    def __init__(self, cls: type[Method], name: str, factories: tuple[Callable[[], nn.Module], Callable[[], nn.Module]],
                 hparams: dict[str, Any]) -> None:
        try:
            student_factory, teacher_factory = factories
        except (TypeError, ValueError):
            raise ValueError(f"nets[{name!r}] must be a (student factory, teacher factory) pair, "
                             f"got {factories!r}") from None
        torch.manual_seed(0)
        student = _kdnet(student_factory, name, "student")
        teacher = _kdnet(teacher_factory, name, "teacher") if cls.needs_teacher or cls.needs_teacher_net else None
        super().__init__(cls, student.info, teacher.info if teacher is not None else None, name, hparams)
        self.where = f"method '{cls.name}' ({cls.__module__}.{cls.__qualname__}), nets '{name}'"
        self.student_net = student.train()
        self.teacher_net = teacher.eval().requires_grad_(False) if teacher is not None else None
        self.pristine = _snapshot(self.teacher_net) if self.teacher_net is not None else None
        self._outputs: dict[int, tuple[Outputs, Outputs | None]] = {}

    def images(self, seed: int = 0) -> torch.Tensor:
        return torch.randn(BATCH, 3, *IMAGE_SIZE, generator=torch.Generator().manual_seed(seed + 3000))

    def outputs(self, seed: int, requires_grad: bool, dtype: torch.dtype,
                device: str | torch.device) -> tuple[Outputs, Outputs | None]:
        from kdzoo.engine import wants

        if seed not in self._outputs:  # computed once per seed: every check sees the same batch
            x = self.images(seed)
            with torch.no_grad():
                s = self.student_net.train()(x, **wants(self.cls))
            t = None
            if self.teacher is not None:
                with torch.inference_mode():
                    t = self.teacher_net(x, **wants(self.cls))
            self._outputs[seed] = (_as_leaves(s), _as_leaves(t) if t is not None else None)
        s, t = self._outputs[seed]
        return _as_leaves(s, requires_grad, dtype, device), (_as_leaves(t, requires_grad, dtype, device)
                                                            if t is not None else None)


def _check_available(cls: type[Method], name: str, infos: Iterable[tuple[str, NetInfo | None]]) -> None:
    """The pair provides the outputs the method asks for (else the engine would refuse the run)."""
    for role, info in infos:
        if info is None:
            continue
        if cls.needs_preact and not info.has_preact:
            raise ValueError(f"pair {name!r}: method '{cls.name}' needs the pre-activation stage outputs "
                             f"(needs_preact), but the {role} has none (NetInfo.has_preact=False); check it on "
                             "pairs that have them")
        if cls.needs_stem and not info.stem_channels:
            raise ValueError(f"pair {name!r}: method '{cls.name}' needs the stem output (needs_stem), but the "
                             f"{role} has none (NetInfo.stem_channels=0); check it on pairs that have one")


def _cases(cls: type[Method], pairs: Pairs | None, hparams: dict[str, Any], nets: Nets | None = None) -> list[_Case]:
    """The supported cases: the synthetic ``pairs`` (default NETINFO_PAIRS; none for a method that needs the
    teacher network) and the real ``nets``; one of each kind when the method needs no teacher."""
    if cls.needs_teacher_net and not nets:
        raise _method_fail(
            cls, "needs_teacher_net=True: bind_teacher(net) needs a teacher network, and the synthetic pairs have "
                 "none",
            f"pass real networks, name -> (student factory, teacher factory), with timm-style models of your "
            f"choice: check_method({cls.__name__}, nets={{'my pair': (lambda: timm.create_model('STUDENT', "
            f"num_classes=10), lambda: timm.create_model('TEACHER', num_classes=10))}}).")
    if nets is not None and not nets:
        raise ValueError("nets must name at least one (student factory, teacher factory) pair")
    if cls.needs_teacher_net and pairs is not None:
        raise ValueError(f"method '{cls.name}' needs the teacher network (needs_teacher_net), which synthetic pairs "
                         "lack: pass nets= only, not pairs=")
    cases: list[_Case] = []
    if not cls.needs_teacher_net:
        chosen = NETINFO_PAIRS if pairs is None else pairs
        if not chosen:
            raise ValueError("pairs must name at least one (student, teacher) pair")
        for name, (s, t) in chosen.items():
            _check_available(cls, name, [("student", s), ("teacher", t if cls.needs_teacher else None)])
            cases.append(_Case(cls, s, t, name, hparams))
    if not cls.needs_teacher:  # the teacher plays no part: one case of each kind suffices
        cases = cases[:1]
    for name, factories in (nets or {}).items():
        case = _NetCase(cls, name, factories, hparams)
        _check_available(cls, name, [("student", case.student), ("teacher", case.teacher)])
        cases.append(case)
        if not cls.needs_teacher:
            break
    live = [c for c in cases if c.supported()]
    if not live:
        reasons = "; ".join(f"'{c.pair}': {c.unsupported}" for c in cases)
        raise _method_fail(cls, f"construction raised PairNotSupported for every pair checked ({reasons})",
                           "pass pairs it supports: check_method(cls, pairs={name: (student NetInfo, teacher "
                           "NetInfo)}) or nets={name: (student factory, teacher factory)}.")
    return live


# --------------------------------------------------------------------------- method checks


def check_declaration(cls: type[Method]) -> None:
    """Class attributes: a name, a family from ``kdzoo.methods.FAMILIES`` (or none), boolean needs_* and
    init-stage flags, ``defaults`` holding every hyperparameter (``w_ce`` included, loss weights named
    ``w_*``, finite and ``>= 0`` unless declared in ``signed_weights``, no ambiguous ``alpha``/``beta``,
    values YAML can express), ``pair_defaults`` overriding known hyperparameters with valid values, and
    the hooks each flag relies on (``init_forward``, ``bind_teacher``, ``bind_train_set``)."""
    who = f"method class {getattr(cls, '__qualname__', cls)!r}"

    def fail(problem: str, fix: str) -> ContractError:
        return ContractError(f"kdzoo contract: {who}: {problem}\n  How to fix: {fix}")

    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise fail("is not a subclass of kdzoo.methods.Method", "class MyMethod(kdzoo.methods.Method): ...")
    if not isinstance(cls.name, str) or not cls.name.isidentifier() or cls.name != cls.name.lower():
        raise fail(f"name = {cls.name!r} is not a lowercase identifier",
                   "set the class attribute name, e.g. name = 'dkd'; it is what configs and --method use.")
    for attr in _FLAGS:
        if not isinstance(getattr(cls, attr), bool):
            raise fail(f"{attr} = {getattr(cls, attr)!r} is not a bool", f"set {attr} = True or False.")
    if not isinstance(cls.family, str) or (cls.family and cls.family not in FAMILIES):
        raise fail(f"family = {cls.family!r} is not one of {', '.join(FAMILIES)}",
                   f"set family to one of {FAMILIES} (what the method matches: the logits, stage features or "
                   "relations between samples); listings group methods by it.")
    defaults = cls.defaults
    if not isinstance(defaults, dict) or "w_ce" not in defaults:
        raise fail(f"defaults = {defaults!r} has no 'w_ce'",
                   "declare every hyperparameter with its published default, the CE weight included: "
                   "defaults = {'w_ce': 1.0, 'w_kd': 0.9, 'T': 4.0}.")
    signed = cls.signed_weights
    if not isinstance(signed, (set, frozenset)) or not all(
            isinstance(k, str) and k.startswith("w_") and k in defaults for k in signed):
        raise fail(f"signed_weights = {signed!r} is not a set of loss-weight names from defaults",
                   "declare the w_* weights that may be negative, e.g. signed_weights = frozenset({'w_kd'}), "
                   "or leave the default frozenset().")
    for key, value in defaults.items():
        if not isinstance(key, str) or not key.isidentifier():
            raise fail(f"hyperparameter name {key!r} is not an identifier", "use names like w_kd or T.")
        if key in AMBIGUOUS_NAMES:
            raise fail(f"hyperparameter {key!r} is ambiguous: papers use it for different loss weights",
                       "name loss weights after their term (w_ce, w_kd, w_tckd, ...); see docs/writing-plugins.md.")
        if key.startswith("w_") and not (isinstance(value, (int, float)) and not isinstance(value, bool)
                                         and math.isfinite(value) and (value >= 0 or key in signed)):
            raise fail(f"loss weight {key} = {value!r} is not a finite number >= 0",
                       f"set {key} to a float, e.g. 1.0; a method whose definition needs a negative {key} "
                       f"declares it: signed_weights = frozenset({{{key!r}}}).")
        if isinstance(value, float) and not math.isfinite(value):
            raise fail(f"default {key} = {value!r} is not finite", f"give {key} its published, finite default.")
        try:
            same = yaml.safe_load(yaml.safe_dump(value))
        except yaml.YAMLError:
            same = object()
        if same != value or type(same) is not type(value):
            raise fail(f"default {key} = {value!r} cannot be written in YAML and read back as the same value",
                       "use values YAML expresses exactly (int, float, str, bool, None, list, dict); a tuple "
                       "comes back as a list.")
    if not isinstance(cls.reference, str):
        raise fail("reference is not a string", "cite where the definition comes from, e.g. the paper and the code.")
    example = "pair_defaults = {('resnet56', 'resnet20'): {'w_kd': 2.0}}"
    if not isinstance(cls.pair_defaults, dict):
        raise fail(f"pair_defaults = {cls.pair_defaults!r} is not a dict",
                   f"map (teacher, student) model names to the hyperparameters the reference sets for them: {example}.")
    for key, values in cls.pair_defaults.items():
        if not (isinstance(key, tuple) and len(key) == 2 and all(isinstance(n, str) and n for n in key)):
            raise fail(f"pair_defaults key {key!r} is not a (teacher, student) pair of model names",
                       f"key each entry by the kdzoo model names, teacher first: {example}.")
        if not isinstance(values, dict) or not values:
            raise fail(f"pair_defaults[{key!r}] = {values!r} is not a non-empty dict of hyperparameters",
                       f"give the hyperparameters the reference sets for this pair: {example}.")
        unknown = sorted(set(values) - set(defaults))
        if unknown:
            raise fail(f"pair_defaults[{key!r}] sets {unknown}, which are not in defaults",
                       "declare every hyperparameter in defaults; pair_defaults only overrides them for a pair.")
        try:
            coerce_hparams(cls.name, defaults, values, signed)
        except KDZooError as e:
            raise fail(f"pair_defaults[{key!r}] is not a valid override: {e}",
                       "give each value the type of its default and a value the method accepts.") from e
    if cls.has_init_stage:
        missing = sorted(set(INIT_STAGE_DEFAULTS) - set(defaults))
        if missing:
            raise fail(f"has_init_stage=True, but defaults lack {missing}",
                       "add the init stage's length to defaults: defaults = {..., **kdzoo.methods.INIT_STAGE_DEFAULTS}.")
        if cls.init_forward is Method.init_forward:
            raise fail("has_init_stage=True, but init_forward is not defined",
                       "define init_forward(self, student, teacher, labels) returning the init stage's weighted "
                       "terms, and init_parameters(self, student) returning what it trains.")
    hooks = (("needs_teacher_net", "bind_teacher", "bind_teacher(self, net), called once with the teacher network"),
             ("needs_train_labels", "bind_train_set", "bind_train_set(self, labels), called once with every "
                                                      "training label"))
    for flag, hook, signature in hooks:
        if getattr(cls, flag) and getattr(cls, hook) is getattr(Method, hook):
            raise fail(f"{flag}=True, but {hook} is not defined, so the flag is pointless",
                       f"define {signature} (derive buffers there), or set {flag} = False.")
    if cls.needs_teacher_net and not cls.needs_teacher:
        raise fail("needs_teacher_net=True but needs_teacher=False: kdzoo loads no teacher for such a method",
                   "set needs_teacher = True.")


def _yaml_text(value: Any) -> str:
    return "\n".join(line for line in yaml.safe_dump(value, default_flow_style=True).splitlines() if line != "...")


def _check_hparams(case: _Case) -> None:
    """Defaults are applied as attributes; each can be overridden from YAML (``--set k=v`` and a
    config mapping); unknown names and negative loss weights (unless in ``signed_weights``) are
    refused with ``KDZooError``; ``w_X`` scales term ``X``."""
    cls = case.cls
    method = case.build()
    expected = {**cls.defaults, **case.hparams}
    if method.hparams != expected:
        raise case.fail(f"hparams is {method.hparams}, expected {expected}",
                        "pass **hparams to super().__init__ unchanged; the base class merges them into defaults.")
    for key, value in expected.items():
        if getattr(method, key, object()) != value:
            raise case.fail(f"attribute self.{key} is {getattr(method, key, '(missing)')!r}, expected {value!r}",
                            "do not overwrite hyperparameter attributes after super().__init__.")
    mapping = yaml.safe_load(yaml.safe_dump({"hparams": expected}))["hparams"]  # a config file round trip
    assignments = [parse_assignment(f"{k}={_yaml_text(v)}") for k, v in expected.items()]  # --set k=v
    assignments += [parse_assignment(f"{k}={int(v)}") for k, v in expected.items()  # T=4 for a float default
                    if isinstance(v, float) and v.is_integer()]
    for overrides in [mapping] + [dict([a]) for a in assignments]:
        try:
            built = cls(case.student, case.teacher, **{**case.hparams, **overrides})
        except Exception as e:
            raise case.fail(f"overriding {overrides} as written in YAML failed: {type(e).__name__}: {e}",
                            "accept every default's own value from a config file; ints for float defaults are "
                            "converted by the base class, so do not check types yourself.") from e
        for k, v in overrides.items():
            if built.hparams[k] != v or type(built.hparams[k]) is not type(expected[k]):
                raise case.fail(f"override {k}={v!r} gave {built.hparams[k]!r}", "let the base class coerce hparams.")
    try:
        cls(case.student, case.teacher, **case.hparams, no_such_hparam_xyz=1)
    except KDZooError:
        pass
    except Exception as e:
        raise case.fail(f"an unknown hyperparameter raised {type(e).__name__}, not KDZooError",
                        "pass **hparams to super().__init__, which names the known ones.") from e
    else:
        raise case.fail("an unknown hyperparameter was accepted silently",
                        "pass **hparams to super().__init__ instead of swallowing them.")
    for key, value in expected.items():  # loss weights are >= 0 unless declared signed
        if not key.startswith("w_") or key in cls.signed_weights or isinstance(value, bool):
            continue
        try:
            cls(case.student, case.teacher, **{**case.hparams, key: type(value)(-1)})
        except KDZooError:
            continue
        except Exception as e:
            raise case.fail(f"a negative {key} raised {type(e).__name__}, not KDZooError",
                            "pass **hparams to super().__init__, which refuses negative weights.") from e
        raise case.fail(f"{key}=-1 was accepted, but {key} is not in signed_weights",
                        "pass **hparams to super().__init__ unchanged (it refuses negative weights), or declare "
                        f"signed_weights = frozenset({{{key!r}}}) if the method's definition needs a negative {key}.")
    s, t, y, idx = case.inputs()
    base = case.call(method, s, t, y, idx, what="with its defaults")
    for term in base:
        if f"w_{term}" not in expected:
            raise case.fail(f"term {term!r} has no weight w_{term} in defaults",
                            f"declare w_{term} in defaults and return w_{term} * loss, so every recipe is explicit.")
    for term in base:
        key = f"w_{term}"
        if not expected[key]:
            continue
        scaled = case.call(case.build(**{key: 2 * expected[key]}), s, t, y, idx, what=f"with {key} doubled")
        if term not in scaled or not torch.allclose(scaled[term], 2 * base[term], rtol=1e-4, atol=1e-6):
            raise case.fail(f"doubling {key} changed term {term!r} from {base[term].item()} to "
                            f"{scaled[term].item() if term in scaled else '(missing)'}, not twice its value",
                            f"return the term already weighted, linearly: {term!r}: self.{key} * loss.")


def _check_terms(case: _Case) -> None:
    """A non-empty dict of finite, floating, scalar tensors with ``"ce"``, at the first and last epoch;
    the ``validate_batch_size`` hook accepts ``BATCH`` and raises nothing but ``KDZooError``."""
    for epoch in (0, EPOCHS - 1):
        method = case.build(epoch=epoch)
        method.train()
        case.call(method, *case.inputs(), what=f"at epoch {epoch} of {EPOCHS}")
    method = case.build()
    for size in (1, 2, BATCH):  # validation calls the hook before training; it may refuse only with KDZooError
        try:
            method.validate_batch_size(size)
        except KDZooError as e:
            if size == BATCH:
                raise case.fail(f"validate_batch_size({BATCH}) refused the batch size the checks use: {e}",
                                f"accept batches of {BATCH}; refuse only sizes the method cannot learn from.") from e
        except Exception as e:
            raise case.fail(f"validate_batch_size({size}) raised {type(e).__name__}: {e}",
                            "raise KDZooError saying which batch sizes work, or return None to accept the size.") from e


def _leaves(out: Outputs | None) -> list[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` for every tensor of ``out``: logits, features[i], embedding, preact[i], stem."""
    if out is None:
        return []
    named = [("logits", out.logits)]
    for field, _, _ in _FIELDS:
        value = getattr(out, field)
        if isinstance(value, list):
            named += [(f"{field}[{i}]", x) for i, x in enumerate(value)]
        elif value is not None:
            named.append((field, value))
    return named


def _teacher_leaks(case: _Case, t: Outputs | None, what: str = "") -> None:
    leaks = [name for name, x in _leaves(t) if x.grad is not None and x.grad.abs().sum() > 0]
    if leaks:
        raise case.fail(f"gradient reaches the teacher's {', '.join(leaks)}{f' ({what})' if what else ''}",
                        "detach the teacher's outputs (teacher.logits.detach()) or compute the teacher side "
                        "under torch.no_grad(); the teacher is frozen and must never be trained by a method.")


def _has_grad(value: torch.Tensor | list[torch.Tensor] | None) -> bool:
    """Whether a non-zero gradient reached ``value`` (a leaf, or any of a list of leaves)."""
    tensors = value if isinstance(value, list) else [value] if value is not None else []
    return any(x.grad is not None and x.grad.abs().sum() > 0 for x in tensors)


def _fields_used(case: _Case, fields: list[str]) -> set[str]:
    """Which of ``fields`` (Outputs names) the method uses in ``forward`` or ``init_forward``: a gradient
    reaches the student's, or the terms change when the teacher's get other values. Each call is on a
    fresh method in train mode under the same seeds, so memory-bank updates and sampling cancel out."""
    used: set[str] = set()
    stages = [False] + ([True] if case.cls.has_init_stage else [])
    for init in stages:
        def run(t_override: Outputs | None = None, grad: bool = False) -> tuple[Outputs | None, dict]:
            method = case.build(epoch=None if init else EPOCHS - 1)
            method.train()
            if init:
                method.init_parameters(case.student_net if case.real else _StandInStudent())
            s, t, y, idx = case.inputs(requires_grad=grad)
            s = s if not init or case.cls.init_uses_student else None
            terms = case.call(method, s, t_override or t, y, idx, init=init, what="init stage" if init else "")
            if grad:
                sum(terms.values()).backward()
            return s, terms

        s, _ = run(grad=True)
        used |= {f for f in fields if s is not None and _has_grad(getattr(s, f))}
        if case.teacher is None:
            continue
        _, base = run()
        for field in set(fields) - used:
            _, t, _, _ = case.inputs()
            g = torch.Generator().manual_seed(4321)
            other = lambda x: torch.randn(x.shape, generator=g).to(x).abs()  # noqa: E731
            value = getattr(t, field)
            setattr(t, field, [other(x) for x in value] if isinstance(value, list) else other(value))
            _, changed = run(t_override=t)
            if set(changed) != set(base) or not all(torch.equal(changed[k], base[k]) for k in base):
                used.add(field)
    return used


def _check_gradients(case: _Case) -> None:
    """Gradients reach the student's outputs that the method uses and every trainable parameter of
    the method, are finite, and never reach the teacher's outputs."""
    method = case.build()
    method.train()
    method.zero_grad(set_to_none=True)
    s, t, y, idx = case.inputs(requires_grad=True)
    terms = case.call(method, s, t, y, idx)
    total = sum(terms.values())
    if not total.requires_grad:
        raise case.fail("the summed loss does not require grad", "compute the terms from the student's outputs.")
    total.backward()
    if s.logits.grad is None or not s.logits.grad.abs().sum() > 0:
        raise case.fail("no gradient reaches the student's logits", "compute 'ce' from student.logits, not a detached copy.")
    unused = [(field, what, flag) for field, what, flag in _FIELDS
              if getattr(case.cls, flag) and not _has_grad(getattr(s, field))]
    if unused:  # the flag may serve the init stage, or the teacher's side only: both are fine
        used = _fields_used(case, [field for field, _, _ in unused])
        for field, what, flag in unused:
            if field not in used:
                stages = "forward() nor init_forward()" if case.cls.has_init_stage else "forward()"
                raise case.fail(f"{flag}=True, but no gradient reaches the student's {what}, and the terms of "
                                f"neither {stages} change with the teacher's",
                                f"use student.{field} (or teacher.{field}) in a loss term, or set {flag}=False so "
                                "the engine does not compute them.")
    if not all(torch.isfinite(x.grad).all() for _, x in _leaves(s) if x.grad is not None):
        raise case.fail("the gradient on the student's outputs is not finite", "guard logs, divisions and roots (eps, clamp).")
    missing = [n for n, p in method.named_parameters() if p.requires_grad and p.grad is None]
    if missing:
        raise case.fail(f"parameters {missing} get no gradient, yet the engine optimises them with the student",
                        "use them in a loss term, or make them buffers (register_buffer) or requires_grad_(False) "
                        "(an init stage's parameters: in start_epoch, which the engine calls before each main-stage "
                        "epoch).")
    bad = [n for n, p in method.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    if bad:
        raise case.fail(f"parameters {bad} get non-finite gradients", "guard logs, divisions and roots (eps, clamp).")
    _teacher_leaks(case, t)


def _check_state_dict(case: _Case) -> None:
    """``state_dict`` survives ``torch.save`` / ``torch.load(weights_only=True)`` into a method
    built (and bound) from another seed, which then computes identical terms for the same inputs
    and training-set indices."""
    s, t, y, idx = case.inputs()
    first = case.build(seed=0)
    first.train()
    case.call(first, s, t, y, idx)  # one training step's worth of buffer updates (BatchNorm statistics, memory banks)
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    try:
        state = torch.load(buf, weights_only=True)
    except Exception as e:
        raise case.fail(f"its state_dict does not load with torch.load(weights_only=True): {e}",
                        "keep only tensors in the state (parameters and buffers); no get_extra_state objects.") from e
    second = case.build(seed=12345)
    try:
        second.load_state_dict(state)
    except Exception as e:
        raise case.fail(f"load_state_dict of its own state_dict failed: {e}",
                        "build the same submodules and buffers for the same NetInfo pair and hparams (buffers "
                        "that bind_train_set or bind_teacher create included).") from e
    second.train()
    for mode in ("train", "eval"):
        first.train(mode == "train")
        second.train(mode == "train")
        a, b = case.call(first, s, t, y, idx, seed=3), case.call(second, s, t, y, idx, seed=3)
        diff = {k: (a[k].item(), b[k].item() if k in b else None) for k in a if k not in b or not torch.equal(a[k], b[k])}
        if diff or set(a) != set(b):
            raise case.fail(f"after saving and loading its state_dict the terms differ in {mode} mode: {diff}",
                            "register every learned or random tensor as a parameter or buffer (register_buffer), "
                            "not as a plain attribute, so it is checkpointed with the student.")


def _check_determinism(case: _Case) -> None:
    """Two methods built and called under the same seeds give bit-identical terms."""
    s, t, y, idx = case.inputs()
    a = case.call(case.build(seed=5), s, t, y, idx, seed=9)
    b = case.call(case.build(seed=5), s, t, y, idx, seed=9)
    if set(a) != set(b) or not all(torch.equal(a[k], b[k]) for k in a):
        raise case.fail(f"two runs under the same seed gave different terms: {a} vs {b}",
                        "draw randomness only from torch's global RNG (the engine seeds it per run), never "
                        "from Python's random, numpy or the clock.")


def _backward_ok(case: _Case, terms: dict[str, torch.Tensor], what: str) -> None:
    try:
        sum(terms.values()).backward()
    except Exception as e:
        raise case.fail(f"backward() failed {what}: {type(e).__name__}: {e}",
                        "create new tensors with the input's dtype and device (torch.zeros_like, x.new_zeros).") from e


def _check_dtypes_and_devices(case: _Case, devices: Iterable[str] | None = None) -> None:
    """The method follows ``.to(torch.float64)`` and ``.to(device)``, and works under bf16
    autocast with float32 parameters and bf16 inputs (what the engine does on GPUs)."""
    devices = list(devices) if devices is not None else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        method = case.build().to(device=device, dtype=torch.float64)
        method.train()
        wrong = [n for n, p in list(method.named_parameters()) + list(method.named_buffers())
                 if p.is_floating_point() and (p.dtype != torch.float64 or p.device.type != torch.device(device).type)]
        if wrong:
            raise case.fail(f"after .to({device!r}, float64) these tensors did not move: {wrong}",
                            "register tensors as parameters or buffers, not plain attributes or Python lists.")
        s, t, y, idx = case.inputs(requires_grad=True, dtype=torch.float64, device=device)
        what = f"on {device} in float64"
        terms = case.call(method, s, t, y, idx, what=what)
        off = [k for k, v in terms.items() if v.device.type != torch.device(device).type]
        if off:
            raise case.fail(f"terms {off} are not on {device} {what}", "create tensors on the input's device.")
        _backward_ok(case, terms, what)
        method = case.build().to(device)
        method.train()
        s, t, y, idx = case.inputs(requires_grad=True, dtype=torch.bfloat16, device=device)
        what = f"on {device} under bfloat16 autocast"
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
            terms = case.call(method, s, t, y, idx, what=what)
        _backward_ok(case, terms, what)


def _check_init_stage(case: _Case) -> None:
    """For ``has_init_stage``: the stage runs for ``num_init_epochs`` > 0 epochs with the defaults and
    for ``init_epochs`` when set; ``init_parameters`` returns distinct parameters, some trainable;
    ``init_forward`` returns valid weighted terms (with ``student=None`` when ``init_uses_student`` is
    False) whose gradients reach only those parameters (the student's own too on real networks), and
    never the teacher's outputs."""
    from kdzoo.engine import wants

    cls = case.cls
    if not cls.has_init_stage:
        return
    stage_defaults = {k: cls.defaults[k] for k in INIT_STAGE_DEFAULTS}
    n = case.build(epoch=None, what="init stage with default length", **stage_defaults).num_init_epochs(240)
    if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
        raise case.fail(f"with the default {stage_defaults}, num_init_epochs(240) is {n!r}: the init stage would not run",
                        "default to kdzoo.methods.INIT_STAGE_DEFAULTS (init_epochs=0: init_fraction of the "
                        "schedule) and do not override num_init_epochs.")
    n = case.build(epoch=None, what="init_epochs=3", init_epochs=3).num_init_epochs(240)
    if n != 3:
        raise case.fail(f"with init_epochs=3, num_init_epochs(240) is {n!r}, not 3",
                        "honour init_epochs: leave num_init_epochs to the base class.")
    method = case.build(epoch=None)  # the init stage runs before any start_epoch
    method.train()
    student_net = case.student_net if case.real else _StandInStudent()
    example = "return list(self.connector.parameters()) (+ kdzoo.methods.feature_parameters(student))"
    try:
        params = method.init_parameters(student_net)
        params = list(params)
    except Exception as e:
        raise case.fail(f"init_parameters(student) raised {type(e).__name__}: {e}",
                        f"init_parameters(self, student) gets the student (a kdzoo.models.KDNet) and returns a list "
                        f"of parameters: {example}.") from e
    if not all(isinstance(p, nn.Parameter) for p in params):
        kinds = sorted({type(p).__name__ for p in params if not isinstance(p, nn.Parameter)})
        raise case.fail(f"init_parameters(student) returned {kinds}, not only nn.Parameter objects",
                        f"return the parameters themselves: {example}.")
    if len({id(p) for p in params}) != len(params):
        raise case.fail("init_parameters(student) returns some parameters twice",
                        "return each parameter once (an optimizer refuses duplicates).")
    trainable = [p for p in params if p.requires_grad]
    if not trainable:
        raise case.fail(f"init_parameters(student) returned {len(params)} parameters, none trainable: the engine "
                        "refuses an init stage that trains nothing",
                        f"return what the init stage trains, with requires_grad on: {example}.")
    init_ids = {id(p) for p in params}
    if case.real:
        net = case.student_net
        net.zero_grad(set_to_none=True)
        x = case.images(0)
        t = None
        if case.teacher is not None:
            with torch.inference_mode():
                t = case.teacher_net(x, **wants(cls))
            t = _as_leaves(t)  # outside inference mode: a normal tensor, as the engine's clone
        s = net.train()(x, **wants(cls)) if cls.init_uses_student else None
        _, _, y, idx = case.inputs()
        named = [(f"student.{n}", p) for n, p in net.named_parameters()]
    else:
        s, t, y, idx = case.inputs(requires_grad=True)
        s = s if cls.init_uses_student else None
        named = []
    named += [(f"method.{n}", p) for n, p in method.named_parameters()]
    what = "init stage" + ("" if cls.init_uses_student else ", student=None since init_uses_student=False")
    terms = case.call(method, s, t, y, idx, what=what, init=True)
    unweighted = [k for k in terms if f"w_{k}" not in cls.defaults]
    if unweighted:
        raise case.fail(f"init_forward() terms {unweighted} have no weights w_<term> in defaults",
                        "declare w_<term> in defaults and return w_<term> * loss, as forward() does.")
    total = sum(terms.values())
    if not total.requires_grad:
        raise case.fail("init_forward()'s summed loss does not require grad: the init stage would train nothing",
                        "compute its terms from the parameters that init_parameters() returns.")
    total.backward()
    stray = [n for n, p in named if p.grad is not None and p.grad.abs().sum() > 0 and id(p) not in init_ids]
    if stray:
        raise case.fail(f"init_forward()'s loss sends gradients to {stray[:6]}{'...' if len(stray) > 6 else ''}, "
                        "which init_parameters() does not return: the init stage's optimizer would not train them",
                        f"return every parameter the init stage trains from init_parameters ({example}), or "
                        "detach what it must not train.")
    if case.real and not any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable):
        raise case.fail("no parameter that init_parameters() returns gets a gradient from init_forward()'s loss",
                        "compute the init stage's terms from the parameters it trains.")
    _teacher_leaks(case, t, "init stage")
    if case.real:
        case.student_net.zero_grad(set_to_none=True)


def _teacher_unchanged(case: _Case, before: tuple[dict, dict, dict], when: str) -> None:
    state, flags, modes = before
    now_state, now_flags, now_modes = _snapshot(case.teacher_net)
    changed = [k for k in state if k not in now_state or state[k].dtype != now_state[k].dtype
               or state[k].shape != now_state[k].shape or not torch.equal(state[k], now_state[k])]
    changed += [k for k in now_state if k not in state]
    if changed:
        raise case.fail(f"the teacher's state_dict changed {when}: {changed[:6]}{'...' if len(changed) > 6 else ''}",
                        "only read the teacher: derive buffers under torch.no_grad() from copies (.clone()); never "
                        "write to its weights or buffers, and never run it in train mode (BatchNorm statistics).")
    flipped = [n for n in flags if flags[n] != now_flags.get(n)]
    if flipped:
        raise case.fail(f"requires_grad of the teacher's parameters {flipped[:6]} changed {when}",
                        "do not call requires_grad_() on the teacher network: it is frozen.")
    moded = [n or "(the net)" for n in modes if modes[n] != now_modes.get(n)]
    if moded:
        raise case.fail(f"the train/eval mode of the teacher's modules {moded[:6]} changed {when}",
                        "do not call train() on the teacher network; it arrives in eval mode and must stay so.")


def _check_teacher_net(case: _Case) -> None:
    """For ``needs_teacher_net``, on real networks: the teacher's state_dict stays bit-identical, its
    requires_grad flags and modes unchanged, after ``bind_teacher`` and after a forward and backward of
    the method, no gradient reaches it, and the method does not keep it (or any of its modules,
    parameters or buffers) as its own."""
    if not case.cls.needs_teacher_net or not case.real:
        return
    net = case.teacher_net
    _teacher_unchanged(case, case.pristine, "since it was built (an earlier bind_teacher or call changed it)")
    before = _snapshot(net)
    method = case.build()
    _teacher_unchanged(case, before, "in bind_teacher(net)")
    teacher_ids = {id(x): f"the teacher's {n}" for n, x in [*net.named_parameters(), *net.named_buffers()]}
    teacher_ids.update({id(m): f"the teacher's {n}" if n else "the teacher network" for n, m in net.named_modules()})
    kept: list[str] = []
    for n, x in [*method.named_modules(), *method.named_parameters(), *method.named_buffers()]:
        if id(x) in teacher_ids and not any(n.startswith(k.split(" ")[0][len("self."):] + ".") for k in kept):
            kept.append(f"self.{n} is {teacher_ids[id(x)]}")
    for attr, value in vars(method).items():  # plain attributes, and lists/tuples/dicts of them
        if attr.startswith("_"):  # _modules, _parameters, _buffers: named_* above
            continue
        values = list(value.values()) if isinstance(value, dict) else list(value) if isinstance(value, (list, tuple)) else [value]
        kept += [f"self.{attr} holds {teacher_ids[id(v)]}" for v in values if id(v) in teacher_ids]
    if kept:
        raise case.fail(f"it keeps the teacher network's own objects: {'; '.join(kept[:6])}",
                        "derive what the method needs in bind_teacher under torch.no_grad() and register copies "
                        "(self.register_buffer('w', net.model.fc.weight.detach().clone())); never assign the "
                        "teacher, its modules or tensors to self (they would be trained, moved and saved with "
                        "the method).")
    method.train()
    s, t, y, idx = case.inputs(requires_grad=True)
    terms = case.call(method, s, t, y, idx, what="after bind_teacher")
    sum(terms.values()).backward()
    _teacher_unchanged(case, before, "in a forward and backward of the method")
    grads = [n for n, p in net.named_parameters() if p.grad is not None]
    if grads:
        raise case.fail(f"gradients reach the teacher's parameters {grads[:6]}",
                        "compute everything derived from the teacher network under torch.no_grad().")


def _check_indices(case: _Case) -> None:
    """For ``needs_indices`` / ``needs_train_labels``: ``forward`` works with the indices of the last
    samples of the training set (``N - B .. N - 1``, ``N = len(labels)`` given to ``bind_train_set``)."""
    cls = case.cls
    if not (cls.needs_indices or cls.needs_train_labels):
        return
    n = len(case.train_labels)
    last = torch.arange(n - BATCH, n)
    method = case.build()
    method.train()
    s, t, y, idx = case.inputs(indices=last)
    case.call(method, s, t, y, idx, what=f"with the training-set indices {n - BATCH}..{n - 1} of {n} samples",
              hint="indices run over 0..N-1, N = len(labels) of bind_train_set (the training set's size): size "
                   "memory banks by it, not by a constant or N - 1.")


def _check_pair_defaults(cls: type[Method], cases: list[_Case]) -> None:
    """For each ``pair_defaults`` key: ``resolve_defaults(teacher, student)`` is ``defaults`` updated with
    its values, and a method built with them (as ``kdzoo.runner.build_method`` passes them, the
    checks' hparams winning) works on every case, or raises PairNotSupported (accepted)."""
    for key, values in cls.pair_defaults.items():
        teacher, student = key
        resolved = cls.resolve_defaults(teacher, student)
        expected = {**cls.defaults, **values}
        if resolved != expected:
            diff = {k: (resolved.get(k), expected.get(k)) for k in set(resolved) | set(expected)
                    if resolved.get(k) != expected.get(k)}
            raise _method_fail(cls, f"resolve_defaults({teacher!r}, {student!r}) differs from defaults updated with "
                                    f"pair_defaults[{key!r}] in {diff} (got, expected)",
                               "give each (teacher, student) pair one key (a key without the '_cifar' suffix also "
                               "serves the name with it: ('resnet56', ...) is ('resnet56_cifar', ...) too), and do "
                               "not override resolve_defaults.")
        overrides = {k: v for k, v in resolved.items() if cls.defaults.get(k) != v}
        for case in cases:
            extra = {k: v for k, v in overrides.items() if k not in case.hparams}
            what = f"with pair_defaults[{key!r}] = {values}"
            try:
                method = case.build(what=what, allow_unsupported=True, **extra)
            except PairNotSupported:
                continue
            method.train()
            case.call(method, *case.inputs(), what=what)


def _run(cls: type[Method], pairs: Pairs | None, nets: Nets | None, hparams: dict[str, Any],
         check: Callable[[_Case], None]) -> None:
    for case in _cases(cls, pairs, hparams, nets):
        check(case)


@_isolated
def check_hparams(method_cls: type[Method], *, pairs: Pairs | None = None, nets: Nets | None = None,
                  **hparams: Any) -> None:
    """Defaults are applied as attributes; each can be overridden from YAML (``--set k=v`` and a
    config mapping); unknown names and negative loss weights (unless declared in ``signed_weights``)
    are refused with ``KDZooError``; every term ``X`` has a weight ``w_X`` that scales it linearly.
    Checked on the first supported pair."""
    _check_hparams(_cases(method_cls, pairs, hparams, nets)[0])


@_isolated
def check_terms(method_cls: type[Method], *, pairs: Pairs | None = None, nets: Nets | None = None,
                **hparams: Any) -> None:
    """For every pair, at the first and last epoch: a non-empty dict of finite, floating, scalar
    tensors that includes ``"ce"``; ``validate_batch_size`` accepts the checks' batch size and refuses
    others only with ``KDZooError``."""
    _run(method_cls, pairs, nets, hparams, _check_terms)


@_isolated
def check_gradients(method_cls: type[Method], *, pairs: Pairs | None = None, nets: Nets | None = None,
                    **hparams: Any) -> None:
    """For every pair: finite gradients reach the student's outputs the method declares and uses and all
    its trainable parameters, and none reaches the teacher's outputs."""
    _run(method_cls, pairs, nets, hparams, _check_gradients)


@_isolated
def check_state_dict(method_cls: type[Method], *, pairs: Pairs | None = None, nets: Nets | None = None,
                     **hparams: Any) -> None:
    """For every pair: ``torch.save`` then ``torch.load(weights_only=True)`` of the state_dict into
    a method built (and bound) from another seed gives identical terms."""
    _run(method_cls, pairs, nets, hparams, _check_state_dict)


@_isolated
def check_determinism(method_cls: type[Method], *, pairs: Pairs | None = None, nets: Nets | None = None,
                      **hparams: Any) -> None:
    """For every pair: the same seeds give bit-identical terms."""
    _run(method_cls, pairs, nets, hparams, _check_determinism)


@_isolated
def check_dtypes_and_devices(method_cls: type[Method], *, pairs: Pairs | None = None, nets: Nets | None = None,
                             devices: Iterable[str] | None = None, **hparams: Any) -> None:
    """For every pair and device (cpu, and cuda when available): float64 after ``.to()``, and
    bfloat16 autocast with float32 parameters, both forward and backward."""
    _run(method_cls, pairs, nets, hparams, lambda case: _check_dtypes_and_devices(case, devices))


@_isolated
def check_init_stage(method_cls: type[Method], *, pairs: Pairs | None = None, nets: Nets | None = None,
                     **hparams: Any) -> None:
    """For a method with ``has_init_stage``, on every pair: its length, ``init_parameters`` and
    ``init_forward`` (see :func:`_check_init_stage`); on real ``nets`` the student's parameters that get
    gradients must be among ``init_parameters`` too. Nothing to check for other methods."""
    _run(method_cls, pairs, nets, hparams, _check_init_stage)


@_isolated
def check_teacher_net(method_cls: type[Method], *, nets: Nets | None = None, **hparams: Any) -> None:
    """For a method with ``needs_teacher_net``, on every pair of ``nets``: the teacher network stays
    read-only (state, flags, modes, no gradient) and is not kept by the method."""
    _run(method_cls, None, nets, hparams, _check_teacher_net)


@_isolated
def check_indices(method_cls: type[Method], *, pairs: Pairs | None = None, nets: Nets | None = None,
                  **hparams: Any) -> None:
    """For a method with ``needs_indices`` or ``needs_train_labels``, on every pair: ``forward`` works
    with the last samples' indices (the state_dict round trip with indices is ``check_state_dict``)."""
    _run(method_cls, pairs, nets, hparams, _check_indices)


@_isolated
def check_pair_defaults(method_cls: type[Method], *, pairs: Pairs | None = None, nets: Nets | None = None,
                        **hparams: Any) -> None:
    """Each ``pair_defaults`` entry resolves to ``defaults`` updated with it and builds and runs on every
    pair (or raises PairNotSupported there)."""
    _check_pair_defaults(method_cls, _cases(method_cls, pairs, hparams, nets))


@_isolated
def check_method(method_cls: type[Method], *, pairs: Pairs | None = None, nets: Nets | None = None,
                 devices: Iterable[str] | None = None, **hparam_overrides: Any) -> None:
    """Run every method check: declaration, hyperparameters, per-pair defaults, and for each
    teacher/student pair (default :data:`NETINFO_PAIRS`, plus the real networks of ``nets``) the teacher
    network's safety, terms, determinism, gradients, state_dict, training-set indices, init stage,
    dtypes and devices.

    ``nets`` maps names to ``(student factory, teacher factory)`` of timm-style models, e.g.
    ``{"small": (lambda: timm.create_model(S, num_classes=10), lambda: timm.create_model(T, num_classes=10))}``;
    a method with ``needs_teacher_net`` is checked on those only (the synthetic pairs have no network).
    A pair whose construction raises ``PairNotSupported`` is skipped; every pair unsupported fails.
    ``hparam_overrides`` are passed to every construction (e.g. a non-default mode to check).
    Raises :class:`ContractError` (an ``AssertionError``) naming the problem and the fix.
    """
    check_declaration(method_cls)
    cases = _cases(method_cls, pairs, hparam_overrides, nets)
    for case in cases:
        _check_teacher_net(case)  # first: every later build binds the teacher again
        _check_terms(case)  # then determinism: the later checks compare repeated calls
        _check_determinism(case)
        _check_gradients(case)
        _check_state_dict(case)
        _check_indices(case)
        _check_init_stage(case)
        _check_dtypes_and_devices(case, devices)
    _check_pair_defaults(method_cls, cases)
    _check_hparams(cases[0])


def check_registered(method_cls: type[Method], registry: Any = None) -> None:
    """The installed package registers ``method_cls`` under its name through the ``kdzoo`` entry points."""
    from kdzoo.plugins import load_plugins

    registry = registry if registry is not None else load_plugins()
    found = registry.methods.get(method_cls.name)
    if found is not method_cls:
        broken = [f"{p.name} ({p.dist}): {p.error}" for p in registry.plugins if p.error]
        disabled = [p.name for p in registry.plugins if p.disabled]
        raise ContractError(
            f"kdzoo contract: method '{method_cls.name}' is "
            + (f"registered as {found.__module__}.{found.__qualname__}, not {method_cls.__qualname__}" if found else "not registered")
            + f". Broken plugins: {broken or 'none'}; disabled: {disabled or 'none'}."
            "\n  How to fix: install the package (pip install -e .), declare it in pyproject.toml under "
            "[project.entry-points.kdzoo], implement @hookimpl register_methods(register) calling "
            "register(MyMethod), and check `kdzoo plugins`."
        )


# --------------------------------------------------------------------------- model checks


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

