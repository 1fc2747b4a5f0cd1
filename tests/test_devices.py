"""The GPU path. Every test here takes a device: it runs on the CPU in the normal suite and on
CUDA under ``pytest -m cuda`` (skipped without a GPU), with the same body.

Covered: the device checks of ``kdzoo.testing``, cohort member == solo run with dropout, resume
== an uninterrupted run, bf16 autocast with every first-party method, and teacher checkpoints
crossing devices. Data is synthetic (no ``KDZOO_DATA`` needed) and tiny: each CPU variant takes
about a second.

Bit-identical results on a GPU need deterministic kernels: the ``deterministic`` fixture turns
them on for CUDA (cuBLAS reads ``CUBLAS_WORKSPACE_CONFIG``, set below, when it starts).
"""
from __future__ import annotations

import os

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before any CUDA work in this process

import pytest  # noqa: E402
import torch  # noqa: E402

from kdzoo.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from kdzoo.config import Recipe  # noqa: E402
from kdzoo.data import Data  # noqa: E402
from kdzoo.engine import Member, Trainer  # noqa: E402
from kdzoo.plugins import load_plugins  # noqa: E402
from kdzoo.runner import build_method, build_student, save_run_checkpoint  # noqa: E402
from kdzoo.teachers import load_teacher  # noqa: E402
from kdzoo.testing import check_dtypes_and_devices, check_model  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
NEEDS_CUDA = [pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")]
DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", marks=NEEDS_CUDA, id="cuda")]
REGISTRY = load_plugins(strict=True)
FIRST_PARTY = ["ce", "kd", "fitnets", "attention", "rkd"]
TEACHER, STUDENT = "wrn_16_2", "wrn_16_1"  # different widths: the feature methods need their regressors


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> torch.device:
    return torch.device(request.param)


@pytest.fixture
def deterministic(device: torch.device):
    """Deterministic CUDA kernels (cuDNN's and the ones torch flags), restored afterwards.
    Nothing changes on the CPU, whose kernels are deterministic already."""
    if device.type != "cuda":
        yield
        return
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[2], saved[3]


@pytest.fixture
def exact_fp32():
    """True float32 matmuls and convolutions on CUDA (no TF32), to compare devices closely."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def synthetic_data(device: torch.device, train: int = 64, test: int = 32, seed: int = 0) -> Data:
    """Random uint8 images and labels shaped like CIFAR-10, on ``device``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (train + test, 3, 32, 32), generator=g, dtype=torch.uint8)
    y = torch.randint(0, 10, (train + test,), generator=g)
    return Data(x[:train].to(device), y[:train].to(device), x[train:].to(device), y[train:].to(device))


def timing_free(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in ("train_img_per_s", "epoch_time_s")} for r in history]


def teacher_net(seed: int = 123):
    return build_student(REGISTRY, TEACHER, {}, seed, num_classes=10)  # untrained but fixed: enough to distil from


def member(method: str, teacher, seed: int = 5, label: str | None = None, **options) -> Member:
    student = build_student(REGISTRY, STUDENT, options, seed, num_classes=10)
    return Member(label or method, student, build_method(REGISTRY, method, {}, student.info, teacher.info, seed))


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# --------------------------------------------------------------------------- kdzoo.testing on each device


@pytest.mark.parametrize("name", FIRST_PARTY)
def test_method_dtypes_and_devices(device: torch.device, name: str) -> None:
    """float64 after ``.to()``, and bf16 autocast forward and backward, on the device."""
    check_dtypes_and_devices(REGISTRY.method(name), devices=[device.type])


@pytest.mark.parametrize("name,options", [("wrn_16_1", {}), ("resnet18", {"cifar_stem": True})],
                         ids=["wrn_16_1", "resnet18-cifar_stem"])
def test_model_contract_on_device(device: torch.device, name: str, options: dict) -> None:
    """The wrapper's stages, embedding and logits, and finite gradients for every parameter, on the device."""
    info = check_model(name, registry=REGISTRY, devices=[device.type], **options)
    assert info.stage_sizes[0] == (32, 32)


# --------------------------------------------------------------------------- the engine on each device


def test_cohort_member_equals_solo_with_dropout(device: torch.device, deterministic) -> None:
    """Each member keeps its own CPU and CUDA RNG streams, which start from the seed alone, so a
    member with dropout draws the same masks in a cohort as alone, whichever methods it trains
    beside (fitnets draws its regressor's weights at construction, ce draws nothing)."""
    data = synthetic_data(device)
    recipe = Recipe(epochs=1, batch_size=32, lr=0.05, eval_batch_size=64)
    teacher = teacher_net()
    methods = ["fitnets", "ce", "kd"]
    cohort = Trainer([member(m, teacher, drop_rate=0.3) for m in methods], data, recipe, teacher=teacher, seed=5,
                     device=device)
    together = cohort.fit()
    for name, result, m in zip(methods, together, cohort.members):
        solo = Trainer([member(name, teacher, drop_rate=0.3)], data, recipe, teacher=teacher, seed=5, device=device)
        (alone,) = solo.fit()
        assert result["status"] == alone["status"] == "ok", (result["error"], alone["error"])
        assert timing_free(result["history"]) == timing_free(alone["history"]), name
        assert same_weights(m.student, solo.members[0].student), name


def test_resume_equals_uninterrupted(device: torch.device, deterministic, tmp_path) -> None:
    """One epoch, the state through a checkpoint file (as ``kdzoo bench`` saves it), a fresh
    trainer, the second epoch: the same histories and weights as two epochs in one go."""
    data = synthetic_data(device)
    recipe = Recipe(epochs=2, batch_size=32, lr=0.05, eval_batch_size=64)
    teacher = teacher_net()

    def trainer() -> Trainer:
        return Trainer([member(m, teacher, drop_rate=0.3) for m in ("kd", "attention")], data, recipe,
                       teacher=teacher, seed=3, device=device)

    straight = trainer()
    expected = straight.fit()
    first = trainer()
    first.train_epoch(0)
    save_checkpoint(tmp_path / "state.pt", {"kind": "cohort-state", "epochs_done": 1, "trainer": first.state_dict()})
    del first
    state = load_checkpoint(tmp_path / "state.pt")
    resumed = trainer()
    resumed.load_state_dict(state["trainer"])
    got = resumed.fit(state["epochs_done"])
    for e, g, ms, mr in zip(expected, got, straight.members, resumed.members):
        assert g["status"] == e["status"] == "ok"
        assert timing_free(g["history"]) == timing_free(e["history"]), e["label"]
        assert same_weights(ms.student, mr.student) and same_weights(ms.method, mr.method), e["label"]


@pytest.mark.parametrize("name", FIRST_PARTY)
def test_bf16_autocast_gives_float32_finite_terms(device: torch.device, name: str) -> None:
    """Under bf16 autocast the networks compute in bf16 and every loss term comes out float32 and
    finite, with finite gradients; an engine step with ``autocast: bf16`` trains without error.
    Tiny batches: CPUs without native bf16 (no AMX) emulate it about 20x slower than float32."""
    data = synthetic_data(device, train=4, test=4)
    teacher = teacher_net().to(device).eval()
    m = member(name, teacher)
    student, method = m.student.to(device), m.method.to(device)
    x, y = next(data.train_batches(0, 0, 4))
    with torch.autocast(device.type, dtype=torch.bfloat16):
        with torch.no_grad():
            t_out = teacher(x, features=method.needs_features, embedding=method.needs_embedding)
        s_out = student(x, features=method.needs_features, embedding=method.needs_embedding)
        terms = method(s_out, t_out if method.needs_teacher else None, y)
    assert s_out.logits.dtype == torch.bfloat16  # autocast is on
    assert terms and all(v.dtype == torch.float32 and torch.isfinite(v) for v in terms.values()), \
        {k: (v.dtype, v.item()) for k, v in terms.items()}
    sum(terms.values()).backward()
    grads = [p.grad for p in list(student.parameters()) + list(method.parameters()) if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)

    trainer = Trainer([member(name, teacher)], data, Recipe(epochs=1, batch_size=4, autocast="bf16",
                                                            eval_batch_size=4), teacher=teacher, seed=0, device=device)
    assert trainer.amp == torch.bfloat16
    (result,) = trainer.fit()
    assert result["status"] == "ok", result["error"]
    assert all(torch.isfinite(torch.tensor(v)) for v in result["history"][-1]["loss"].values())


# --------------------------------------------------------------------------- checkpoints across devices


CROSSINGS = [pytest.param("cpu", "cpu", id="cpu-to-cpu"),
             pytest.param("cuda", "cpu", marks=NEEDS_CUDA, id="cuda-to-cpu"),
             pytest.param("cpu", "cuda", marks=NEEDS_CUDA, id="cpu-to-cuda")]


@pytest.mark.parametrize("src,dst", CROSSINGS)
def test_teacher_checkpoint_crosses_devices(src: str, dst: str, tmp_path, exact_fp32) -> None:
    """A teacher trained on ``src`` is saved, loaded (a plain ``torch.load`` gives CPU tensors),
    gives the same logits on ``dst``, and a student distils from it there."""
    src_dev, dst_dev = torch.device(src), torch.device(dst)
    off = Recipe(epochs=1, batch_size=32, lr=0.05, eval_batch_size=64, autocast="off")
    data = synthetic_data(src_dev)
    t = build_student(REGISTRY, TEACHER, {}, 1, num_classes=10)
    t_member = Member("teacher", t, build_method(REGISTRY, "ce", {}, t.info, None, 1))
    (result,) = Trainer([t_member], data, off, seed=1, device=src_dev).fit()
    assert result["status"] == "ok"
    path = tmp_path / "teacher.pt"
    save_run_checkpoint(path, TEACHER, {}, t, t_member.method, result, data, 1)
    raw = torch.load(path, weights_only=True)  # no map_location: tensors must have been saved on the CPU
    assert all(v.device.type == "cpu" for v in raw["state_dict"].values())

    loaded, ckpt = load_teacher(REGISTRY, path)
    assert ckpt["meta"]["top1"] == result["last"]["top1"]
    x = data.normalize(data.test_x[:16])
    with torch.no_grad():
        expected = t.eval()(x).logits.cpu()
        got = loaded.to(dst_dev)(x.to(dst_dev)).logits.cpu()
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-4)

    student_data = synthetic_data(dst_dev, seed=1)
    s = member("kd", loaded, seed=2)
    (distilled,) = Trainer([s], student_data, off, teacher=loaded, seed=2, device=dst_dev).fit()
    assert distilled["status"] == "ok", distilled["error"]
    assert "agreement" in distilled["last"]
