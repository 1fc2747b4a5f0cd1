"""Contract checks for kdzoo plugins, for plugin authors' own test suites.

Every check runs on tiny random tensors on the CPU (and on CUDA when there is one) and raises
:class:`ContractError`, an ``AssertionError``, whose message says what the author must fix::

    from kdzoo.testing import check_method, check_model

    def test_my_method_follows_the_contract():
        check_method(MyMethod)               # every method check, several teacher/student pairs

    def test_my_backbone_follows_the_contract():
        check_model(my_factory)              # or a registered name: check_model("resnet20")

Installing kdzoo gives every test suite the fixtures ``kdzoo_registry``, ``kdzoo_check_method``,
``kdzoo_check_model`` and ``kdzoo_netinfo_pairs``, from the pytest plugin :mod:`kdzoo.pytest_plugin`
(entry point ``pytest11``, name ``kdzoo``), which imports this module only when a test uses one: a
pytest run that uses none never imports torch. The individual checks are public too, for
an author who needs only some of them (``check_declaration``, ``check_hparams``,
``check_terms``, ``check_gradients``, ``check_state_dict``, ``check_determinism``,
``check_dtypes_and_devices``; ``check_feature_info``, ``check_kdnet``, ``check_model_backward``).
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
from kdzoo.methods import Method
from kdzoo.models import KDNet, NetInfo, Outputs

# Loss-weight names that mean different things in different papers (RepDistiller's alpha is the
# KD weight, the seed article's alpha is the CE weight, DKD's alpha/beta weigh TCKD/NCKD).
AMBIGUOUS_NAMES = frozenset({"alpha", "beta"})
BATCH = 4
EPOCHS = 10  # the schedule the checks pretend to train for; terms are checked at the first and last epoch


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
    return NetInfo(stage_channels=tuple(channels), stage_sizes=tuple((s, s) for s in sizes),
                   embed_dim=embed_dim, num_classes=10, input_size=(32, 32))


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


# --------------------------------------------------------------------------- inputs


def make_outputs(info: NetInfo, *, batch: int = BATCH, seed: int = 0, features: bool = False,
                 embedding: bool = False, requires_grad: bool = False, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu") -> Outputs:
    """Random ``Outputs`` shaped like ``info``: logits ``(B, classes)``, post-ReLU stage features
    ``(B, C, H, W)`` and a post-ReLU embedding ``(B, D)``; features/embedding only when asked.
    With ``requires_grad`` every tensor is a leaf whose ``.grad`` shows what reached it."""
    g = torch.Generator().manual_seed(seed)

    def leaf(t: torch.Tensor) -> torch.Tensor:
        return t.to(device=device, dtype=dtype).detach().requires_grad_(requires_grad)

    logits = leaf(2 * torch.randn(batch, info.num_classes, generator=g))
    feats = ([leaf(torch.randn(batch, c, h, w, generator=g).relu())
              for c, (h, w) in zip(info.stage_channels, info.stage_sizes)] if features else None)
    emb = leaf(torch.randn(batch, info.embed_dim, generator=g).relu()) if embedding else None
    return Outputs(logits=logits, features=feats, embedding=emb)


def make_labels(info: NetInfo, *, batch: int = BATCH, seed: int = 0, device: str | torch.device = "cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 1000)
    return torch.randint(info.num_classes, (batch,), generator=g).to(device)


class _Case:
    """One method class, one teacher/student pair and fixed hyperparameters: builds and calls it."""

    def __init__(self, cls: type[Method], student: NetInfo, teacher: NetInfo, pair: str, hparams: dict[str, Any]) -> None:
        self.cls, self.student, self.pair, self.hparams = cls, student, pair, dict(hparams)
        self.teacher = teacher if cls.needs_teacher else None
        self.where = f"method '{cls.name}' ({cls.__module__}.{cls.__qualname__}), pair '{pair}'"

    def fail(self, problem: str, fix: str) -> ContractError:
        return ContractError(f"kdzoo contract: {self.where}: {problem}\n  How to fix: {fix}")

    def build(self, seed: int = 0, epoch: int = EPOCHS - 1, **extra: Any) -> Method:
        torch.manual_seed(seed)
        try:
            method = self.cls(self.student, self.teacher, **{**self.hparams, **extra})
        except KDZooError as e:
            raise self.fail(
                f"construction refused this pair: {e}",
                "support this kind of teacher/student pair (see kdzoo.models.pair_stages for the "
                "stage-pairing rule), or, if the method cannot by design, pass the pairs it supports: "
                "check_method(cls, pairs={...}).",
            ) from e
        except Exception as e:
            raise self.fail(
                f"construction raised {type(e).__name__}: {e}",
                "__init__(self, student, teacher=None, **hparams) must call "
                "super().__init__(student, teacher, **hparams) and build its submodules from the NetInfo "
                "descriptions (stage_channels, stage_sizes, embed_dim, num_classes).",
            ) from e
        if not isinstance(method, Method):
            raise self.fail(f"construction returned {type(method).__name__}", "subclass kdzoo.methods.Method.")
        method.start_epoch(epoch, EPOCHS)
        return method

    def inputs(self, seed: int = 0, requires_grad: bool = False, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu") -> tuple[Outputs, Outputs | None, torch.Tensor]:
        kw = dict(features=self.cls.needs_features, embedding=self.cls.needs_embedding,
                  requires_grad=requires_grad, dtype=dtype, device=device)
        s = make_outputs(self.student, seed=seed, **kw)
        t = make_outputs(self.teacher, seed=seed + 1, **kw) if self.teacher is not None else None
        return s, t, make_labels(self.student, seed=seed, device=device)

    def call(self, method: Method, s: Outputs, t: Outputs | None, y: torch.Tensor, seed: int = 0,
             what: str = "") -> dict[str, torch.Tensor]:
        torch.manual_seed(seed)
        try:
            terms = method(s, t, y)
        except Exception as e:
            hint = ("the engine passes features/embedding only when the method declares needs_features=True / "
                    "needs_embedding=True, and teacher=None when needs_teacher=False; declare what forward() reads."
                    if "None" in str(e) else
                    "forward(student, teacher, labels) must work on any batch of Outputs shaped as the NetInfo "
                    "descriptions say.")
            raise self.fail(f"forward() raised {type(e).__name__}: {e}{f' ({what})' if what else ''}", hint) from e
        self.validate(terms, what)
        return terms

    def validate(self, terms: Any, what: str = "") -> None:
        ctx = f" ({what})" if what else ""
        example = "return {'ce': self.w_ce * self.ce(student.logits, labels), 'kd': self.w_kd * kd}"
        if not isinstance(terms, dict) or not terms:
            raise self.fail(f"forward() returned {type(terms).__name__}, not a non-empty dict of loss terms{ctx}",
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
        if "ce" not in terms:
            raise self.fail(f"forward() returned {sorted(terms)}, without the cross-entropy term 'ce'{ctx}",
                            f"every method returns the label cross-entropy weighted by w_ce, so its recipe is "
                            f"explicit: {example}.")


def _cases(cls: type[Method], pairs: Pairs | None, hparams: dict[str, Any]) -> list[_Case]:
    pairs = NETINFO_PAIRS if pairs is None else pairs
    if not pairs:
        raise ValueError("pairs must name at least one (student, teacher) pair")
    if not cls.needs_teacher:  # the teacher plays no part: one case suffices
        pairs = dict(list(pairs.items())[:1])
    return [_Case(cls, s, t, name, hparams) for name, (s, t) in pairs.items()]


# --------------------------------------------------------------------------- method checks


def check_declaration(cls: type[Method]) -> None:
    """Class attributes: a name, boolean needs_*, and ``defaults`` holding every hyperparameter
    (``w_ce`` included, loss weights named ``w_*``, finite and ``>= 0`` unless declared in
    ``signed_weights``, no ambiguous ``alpha``/``beta``, values YAML can express)."""
    who = f"method class {getattr(cls, '__qualname__', cls)!r}"

    def fail(problem: str, fix: str) -> ContractError:
        return ContractError(f"kdzoo contract: {who}: {problem}\n  How to fix: {fix}")

    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise fail("is not a subclass of kdzoo.methods.Method", "class MyMethod(kdzoo.methods.Method): ...")
    if not isinstance(cls.name, str) or not cls.name.isidentifier() or cls.name != cls.name.lower():
        raise fail(f"name = {cls.name!r} is not a lowercase identifier",
                   "set the class attribute name, e.g. name = 'dkd'; it is what configs and --method use.")
    for attr in ("needs_teacher", "needs_features", "needs_embedding"):
        if not isinstance(getattr(cls, attr), bool):
            raise fail(f"{attr} = {getattr(cls, attr)!r} is not a bool", f"set {attr} = True or False.")
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
                            "pass **hparams to super().__init__, which refuses negative loss weights.") from e
        raise case.fail(f"{key}=-1 was accepted, but {key} is not in signed_weights",
                        "pass **hparams to super().__init__ unchanged (it refuses negative weights), or declare "
                        f"signed_weights = frozenset({{{key!r}}}) if the method's definition needs a negative {key}.")
    s, t, y = case.inputs()
    base = case.call(method, s, t, y, what="with its defaults")
    for term in base:
        if f"w_{term}" not in expected:
            raise case.fail(f"term {term!r} has no weight w_{term} in defaults",
                            f"declare w_{term} in defaults and return w_{term} * loss, so every recipe is explicit.")
    for term in base:
        key = f"w_{term}"
        if not expected[key]:
            continue
        scaled = case.call(case.build(**{key: 2 * expected[key]}), s, t, y, what=f"with {key} doubled")
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


def _check_gradients(case: _Case) -> None:
    """Gradients reach the student's outputs that the method uses and every trainable parameter of
    the method, are finite, and never reach the teacher's outputs."""
    method = case.build()
    method.train()
    method.zero_grad(set_to_none=True)
    s, t, y = case.inputs(requires_grad=True)
    terms = case.call(method, s, t, y)
    total = sum(terms.values())
    if not total.requires_grad:
        raise case.fail("the summed loss does not require grad", "compute the terms from the student's outputs.")
    total.backward()
    if s.logits.grad is None or not s.logits.grad.abs().sum() > 0:
        raise case.fail("no gradient reaches the student's logits", "compute 'ce' from student.logits, not a detached copy.")
    for flag, what, tensors in (("needs_features", "stage features", s.features),
                                ("needs_embedding", "embedding", [s.embedding] if s.embedding is not None else None)):
        if getattr(case.cls, flag) and not any(x.grad is not None and x.grad.abs().sum() > 0 for x in tensors):
            raise case.fail(f"{flag}=True, but no gradient reaches the student's {what}",
                            f"use student.{'features' if flag == 'needs_features' else 'embedding'} in a loss term, "
                            f"or set {flag}=False so the engine does not compute them.")
    student_grads = [s.logits.grad] + [x.grad for x in (s.features or []) + [s.embedding] if x is not None and x.grad is not None]
    if not all(torch.isfinite(g).all() for g in student_grads):
        raise case.fail("the gradient on the student's outputs is not finite", "guard logs, divisions and roots (eps, clamp).")
    missing = [n for n, p in method.named_parameters() if p.requires_grad and p.grad is None]
    if missing:
        raise case.fail(f"parameters {missing} get no gradient, yet the engine optimises them with the student",
                        "use them in a loss term, or make them buffers (register_buffer) or requires_grad_(False).")
    bad = [n for n, p in method.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    if bad:
        raise case.fail(f"parameters {bad} get non-finite gradients", "guard logs, divisions and roots (eps, clamp).")
    if t is not None:
        leaks = [name for name, x in [("logits", t.logits), ("embedding", t.embedding)]
                 + [(f"features[{i}]", f) for i, f in enumerate(t.features or [])]
                 if x is not None and x.grad is not None and x.grad.abs().sum() > 0]
        if leaks:
            raise case.fail(f"gradient reaches the teacher's {', '.join(leaks)}",
                            "detach the teacher's outputs (teacher.logits.detach()) or compute the teacher side "
                            "under torch.no_grad(); the teacher is frozen and must never be trained by a method.")


def _check_state_dict(case: _Case) -> None:
    """``state_dict`` survives ``torch.save`` / ``torch.load(weights_only=True)`` into a method
    built from another seed, which then computes identical terms."""
    s, t, y = case.inputs()
    first = case.build(seed=0)
    first.train()
    case.call(first, s, t, y)  # one training step's worth of buffer updates (BatchNorm statistics)
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
                        "build the same submodules and buffers for the same NetInfo pair and hparams.") from e
    second.train()
    for mode in ("train", "eval"):
        first.train(mode == "train")
        second.train(mode == "train")
        a, b = case.call(first, s, t, y, seed=3), case.call(second, s, t, y, seed=3)
        diff = {k: (a[k].item(), b[k].item() if k in b else None) for k in a if k not in b or not torch.equal(a[k], b[k])}
        if diff or set(a) != set(b):
            raise case.fail(f"after saving and loading its state_dict the terms differ in {mode} mode: {diff}",
                            "register every learned or random tensor as a parameter or buffer (register_buffer), "
                            "not as a plain attribute, so it is checkpointed with the student.")


def _check_determinism(case: _Case) -> None:
    """Two methods built and called under the same seeds give bit-identical terms."""
    s, t, y = case.inputs()
    a = case.call(case.build(seed=5), s, t, y, seed=9)
    b = case.call(case.build(seed=5), s, t, y, seed=9)
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
        s, t, y = case.inputs(requires_grad=True, dtype=torch.float64, device=device)
        what = f"on {device} in float64"
        terms = case.call(method, s, t, y, what=what)
        off = [k for k, v in terms.items() if v.device.type != torch.device(device).type]
        if off:
            raise case.fail(f"terms {off} are not on {device} {what}", "create tensors on the input's device.")
        _backward_ok(case, terms, what)
        method = case.build().to(device)
        method.train()
        s, t, y = case.inputs(requires_grad=True, dtype=torch.bfloat16, device=device)
        what = f"on {device} under bfloat16 autocast"
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
            terms = case.call(method, s, t, y, what=what)
        _backward_ok(case, terms, what)


Pairs = Mapping[str, tuple[NetInfo, NetInfo]]


@_isolated
def check_hparams(method_cls: type[Method], *, pairs: Pairs | None = None, **hparams: Any) -> None:
    """Defaults are applied as attributes; each can be overridden from YAML (``--set k=v`` and a
    config mapping); unknown names and negative loss weights (unless declared in ``signed_weights``)
    are refused with ``KDZooError``; every term ``X`` has a weight ``w_X`` that scales it linearly.
    Checked on the first pair."""
    _check_hparams(_cases(method_cls, pairs, hparams)[0])


@_isolated
def check_terms(method_cls: type[Method], *, pairs: Pairs | None = None, **hparams: Any) -> None:
    """For every pair, at the first and last epoch: a non-empty dict of finite, floating, scalar
    tensors that includes ``"ce"``; ``validate_batch_size`` accepts the checks' batch size and refuses
    others only with ``KDZooError``."""
    for case in _cases(method_cls, pairs, hparams):
        _check_terms(case)


@_isolated
def check_gradients(method_cls: type[Method], *, pairs: Pairs | None = None, **hparams: Any) -> None:
    """For every pair: finite gradients reach the student's outputs the method uses and all its
    trainable parameters, and none reaches the teacher's outputs."""
    for case in _cases(method_cls, pairs, hparams):
        _check_gradients(case)


@_isolated
def check_state_dict(method_cls: type[Method], *, pairs: Pairs | None = None, **hparams: Any) -> None:
    """For every pair: ``torch.save`` then ``torch.load(weights_only=True)`` of the state_dict into
    a method built from another seed gives identical terms."""
    for case in _cases(method_cls, pairs, hparams):
        _check_state_dict(case)


@_isolated
def check_determinism(method_cls: type[Method], *, pairs: Pairs | None = None, **hparams: Any) -> None:
    """For every pair: the same seeds give bit-identical terms."""
    for case in _cases(method_cls, pairs, hparams):
        _check_determinism(case)


@_isolated
def check_dtypes_and_devices(method_cls: type[Method], *, pairs: Pairs | None = None,
                             devices: Iterable[str] | None = None, **hparams: Any) -> None:
    """For every pair and device (cpu, and cuda when available): float64 after ``.to()``, and
    bfloat16 autocast with float32 parameters, both forward and backward."""
    for case in _cases(method_cls, pairs, hparams):
        _check_dtypes_and_devices(case, devices)


@_isolated
def check_method(method_cls: type[Method], *, pairs: Pairs | None = None,
                 devices: Iterable[str] | None = None, **hparam_overrides: Any) -> None:
    """Run every method check: declaration, hyperparameters, and for each teacher/student pair
    (default :data:`NETINFO_PAIRS`) terms, determinism, gradients, state_dict, dtypes and devices.

    ``hparam_overrides`` are passed to every construction (e.g. a non-default mode to check).
    Raises :class:`ContractError` (an ``AssertionError``) naming the problem and the fix.
    """
    check_declaration(method_cls)
    cases = _cases(method_cls, pairs, hparam_overrides)
    for case in cases:  # determinism first: the later checks compare repeated calls
        _check_terms(case)
        _check_determinism(case)
        _check_gradients(case)
        _check_state_dict(case)
        _check_dtypes_and_devices(case, devices)
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

