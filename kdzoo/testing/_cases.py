"""One method class on one teacher/student pair, built, bound and called as the engine does it:
:class:`_Case` for a synthetic NetInfo pair, :class:`_NetCase` for real networks, and :func:`_cases`,
the supported cases a check runs on. Also the teacher-network snapshot the checks compare against."""
from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch import nn

from kdzoo import KDZooError
from kdzoo.methods import Method, PairNotSupported
from kdzoo.models import KDNet, NetInfo, Outputs
from kdzoo.testing._common import (BATCH, EPOCHS, IMAGE_SIZE, NETINFO_PAIRS, _FIELDS, ContractError, Nets, Pairs,
                                   _as_leaves, _method_fail, make_labels, make_outputs, make_train_labels)


def _snapshot(net: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, bool], dict[str, bool]]:
    """The teacher's state_dict (copied), its parameters' requires_grad flags and its modules' modes."""
    return ({k: v.detach().clone() for k, v in net.state_dict().items()},
            {n: p.requires_grad for n, p in net.named_parameters()},
            {n: m.training for n, m in net.named_modules()})


def _teacher_unchanged(case: _Case, before: tuple[dict, dict, dict], when: str) -> None:
    """The teacher network's state, requires_grad flags and modes are those of ``before`` (a ``_snapshot``)."""
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
