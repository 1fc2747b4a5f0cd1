"""The method checks: the class declaration, hyperparameters, terms, gradients, state_dict, determinism,
dtypes and devices, init stage, teacher network, training-set indices and per-pair defaults, each public
as ``check_*`` (every pair of :func:`kdzoo.testing._cases._cases`), all of them in :func:`check_method`;
and :func:`check_registered`, the installed entry point."""
from __future__ import annotations

import io
import math
from typing import Any, Callable, Iterable

import torch
import yaml
from torch import nn

from kdzoo import KDZooError
from kdzoo.config import parse_assignment
from kdzoo.methods import FAMILIES, INIT_STAGE_DEFAULTS, Method, PairNotSupported, coerce_hparams
from kdzoo.models import Outputs
from kdzoo.testing._cases import _Case, _StandInStudent, _cases, _snapshot, _teacher_unchanged
from kdzoo.testing._common import (BATCH, EPOCHS, _FIELDS, ContractError, Nets, Pairs, _as_leaves, _isolated,
                                   _method_fail)

# Loss-weight names that mean different things in different papers (RepDistiller's alpha is the
# KD weight, the seed article's alpha is the CE weight, DKD's alpha/beta weigh TCKD/NCKD).
AMBIGUOUS_NAMES = frozenset({"alpha", "beta"})
_FLAGS = ("needs_teacher", "needs_features", "needs_embedding", "needs_preact", "needs_stem", "needs_indices",
          "needs_train_labels", "needs_teacher_net", "has_init_stage", "init_uses_student")


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
