"""The teacher's logits cached per (teacher, seed, epoch): later cohorts of logit-only methods skip the teacher and
give bit-identical runs; a cache that does not match what the teacher computes, or a damaged file, is not used."""
from __future__ import annotations

import pytest
import torch

from kdzoo.config import Recipe
from kdzoo.data import prepare_data
from kdzoo.engine import Member, Trainer
from kdzoo.logit_cache import TeacherLogits
from kdzoo.plugins import load_plugins
from kdzoo.runner import build_method, build_student
from kdzoo_plugins.cifar10 import load_cifar10

RECIPE = Recipe(epochs=2, batch_size=64, lr=0.05, eval_batch_size=500)


@pytest.fixture(scope="module")
def registry():
    return load_plugins(strict=True)


@pytest.fixture(scope="module")
def data(cifar_path):
    return prepare_data(load_cifar10(cifar_path), train_size=256, test_size=200, subset_seed=0)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KDZOO_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "teacher-logits"


def member(registry, method, teacher, seed=7):
    student = build_student(registry, "resnet8", {}, seed, num_classes=10)
    return Member(method, student, build_method(registry, method, {}, student.info, teacher.info, seed))


def teacher_net(registry):
    return build_student(registry, "resnet20", {}, 123, num_classes=10)  # untrained but fixed


def timing_free(history):
    return [{k: v for k, v in r.items() if k not in ("train_img_per_s", "epoch_time_s")} for r in history]


def train(registry, data, teacher, methods, key, seed=7):
    """Train ``methods`` as one cohort; returns (histories, the trainer, teacher forwards while training)."""
    trainer = Trainer([member(registry, m, teacher, seed) for m in methods], data, RECIPE, teacher=teacher, seed=seed,
                      teacher_key=key)
    forwards, training = [], []  # the teacher's forward passes on training batches (not its test predictions)
    hook = teacher.register_forward_hook(lambda *_: forwards.append(1) if training == [True] else None)

    def flagged(fn, flag):
        def wrapped(*args):
            training.append(flag)
            try:
                return fn(*args)
            finally:
                training.pop()
        return wrapped

    trainer.train_epoch = flagged(trainer.train_epoch, True)
    trainer.evaluate = flagged(trainer.evaluate, False)
    try:
        results = trainer.fit()
    finally:
        hook.remove()
    return {m: timing_free(r["history"]) for m, r in zip(methods, results)}, trainer, len(forwards)


def live_logits(teacher, data, epoch, seed=7):
    """The teacher's logits on an epoch's training batches, computed here in float32 (the independent reference)."""
    teacher.eval()
    with torch.inference_mode():
        return torch.cat([teacher(x.contiguous(memory_format=torch.channels_last)).logits
                          for x, _ in data.train_batches(seed, epoch, RECIPE.batch_size)])


def test_a_later_cohort_reads_the_teachers_logits_and_equals_a_run_without_the_cache(registry, data, cache):
    teacher = teacher_net(registry)
    steps = data.steps_per_epoch(RECIPE.batch_size)
    reference, _, forwards = train(registry, data, teacher, ["kd", "dkd"], key=None)
    assert forwards == 2 * steps and not cache.exists()  # no key: no cache

    # A cohort with a feature method runs the teacher and writes its logits, epoch by epoch.
    _, first, forwards = train(registry, data, teacher, ["attention", "kd"], key="teacher-a")
    assert forwards == 2 * steps and first.cached_epochs == []
    (folder,) = cache.iterdir()
    assert sorted(p.name for p in folder.iterdir()) == ["epoch-0000.pt", "epoch-0001.pt"]
    for epoch in (0, 1):
        stored = torch.load(folder / f"epoch-{epoch:04d}.pt", weights_only=True)
        assert stored.dtype == torch.float32 and torch.equal(stored, live_logits(teacher, data, epoch))

    # A later cohort of logit methods runs the teacher once per epoch (the check of the first batch) and gives
    # the same runs, bit for bit, as the cohort that ran the teacher on every batch.
    cached, second, forwards = train(registry, data, teacher, ["kd", "dkd"], key="teacher-a")
    assert second.cached_epochs == [0, 1] and forwards == 2
    assert cached == reference

    # Another seed or another teacher is another key: computed live, never read from this one.
    _, other, forwards = train(registry, data, teacher, ["kd"], key="teacher-b")
    assert other.cached_epochs == [] and forwards == 2 * steps and len(list(cache.iterdir())) == 2
    _, other, _ = train(registry, data, teacher, ["kd"], key="teacher-a", seed=8)
    assert other.cached_epochs == [] and len(list(cache.iterdir())) == 3


@pytest.mark.parametrize("damage", ["other logits", "random bytes", "too short"])
def test_a_cache_that_does_not_match_the_teacher_is_not_used_and_is_rewritten(registry, data, cache, damage):
    teacher = teacher_net(registry)
    reference, _, _ = train(registry, data, teacher, ["kd"], key="teacher-a")
    (folder,) = cache.iterdir()
    path = folder / "epoch-0000.pt"
    true = torch.load(path, weights_only=True)
    if damage == "other logits":  # e.g. written by another machine whose kernels round differently
        torch.save(true * 1.0001, path)
    elif damage == "random bytes":
        path.write_bytes(b"\x00not a tensor" * 10)
    else:
        torch.save(true[:-1], path)
    again, trainer, _ = train(registry, data, teacher, ["kd"], key="teacher-a")
    assert trainer.cached_epochs == [1]  # epoch 0 was computed live ...
    assert again == reference
    assert torch.equal(torch.load(path, weights_only=True), true)  # ... and written anew


def test_the_key_covers_what_the_logits_depend_on(data, tmp_path, cifar_path):
    def folder(**change):
        args = dict(teacher_key="t", seed=0, data=data, batch_size=64, flip="random", dtype=None,
                    device=torch.device("cpu"), memory_format=torch.channels_last, root=tmp_path)
        return TeacherLogits.open(**{**args, **change}).folder

    base = folder()
    assert folder() == base
    for change in [{"teacher_key": "u"}, {"seed": 1}, {"batch_size": 128}, {"flip": "alternating"},
                   {"dtype": torch.bfloat16}, {"memory_format": torch.contiguous_format}]:
        assert folder(**change) != base, change
    other = prepare_data(load_cifar10(cifar_path), train_size=256, test_size=200, subset_seed=1)
    assert folder(data=other) != base  # other training images



def test_a_cache_that_cannot_be_written_does_not_stop_training(registry, data, tmp_path, monkeypatch):
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the cache folder would be")
    monkeypatch.setenv("KDZOO_CACHE", str(blocked))
    teacher = teacher_net(registry)
    histories, trainer, _ = train(registry, data, teacher, ["kd"], key="teacher-a")
    assert trainer.logit_cache.unwritable and trainer.cached_epochs == []
    assert histories == train(registry, data, teacher, ["kd"], key=None)[0]


def test_the_images_digest_is_of_the_bytes_and_forgotten_with_the_tensor():
    import gc
    import hashlib

    from kdzoo.logit_cache import _DIGESTS, images_digest

    def expected(t):
        return hashlib.blake2b(t.numpy().tobytes(), digest_size=16).hexdigest()

    for _ in range(3):  # a freed tensor's memory (and id) is often reused by the next one of its size
        x = torch.randint(0, 256, (8, 3, 4, 4), dtype=torch.uint8)
        assert images_digest(x) == expected(x) and id(x) in _DIGESTS
        key = id(x)
        del x
        gc.collect()
        assert key not in _DIGESTS
