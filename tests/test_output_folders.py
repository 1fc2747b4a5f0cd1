"""An output folder that cannot be written is refused before any training, in one paragraph."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from kdzoo import KDZooError
from kdzoo.checkpoint import ensure_writable_dir


def _train(out: Path, cifar_path: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "kdzoo.cli", "train", "--model", "resnet20", "--epochs", "1", "--train-size", "500",
         "--test-size", "100", "--data", cifar_path, "--out", str(out)],
        capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"}, timeout=300)


@pytest.mark.parametrize("where", ["an existing file", "below a file"])
def test_train_refuses_an_unwritable_out_before_training(cifar_path, tmp_path, where):
    (tmp_path / "file").write_text("keep me")
    out = tmp_path / "file" if where == "an existing file" else tmp_path / "file" / "run"
    proc = _train(out, cifar_path)
    text = " ".join(proc.stderr.split())
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "--out folder" in text and "is a file" in text and "nothing has been trained yet" in text
    assert "epoch" not in proc.stdout.lower()  # no training started
    assert (tmp_path / "file").read_text() == "keep me"


def test_a_folder_the_user_cannot_write_is_refused():
    """As an unprivileged user (root ignores permissions: the check runs in a forked child that drops to nobody)."""
    base = Path(tempfile.mkdtemp(prefix="kdzoo-perm-"))
    try:
        base.chmod(0o755)
        locked = base / "locked"
        locked.mkdir(mode=0o555)
        locked.chmod(0o555)
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: drop privileges if we have them, run the check, report through the pipe
            os.close(read)
            message = "no error"
            try:
                if os.geteuid() == 0:
                    os.setgid(65534)
                    os.setuid(65534)
                for target in (locked, locked / "sub"):
                    try:
                        ensure_writable_dir(target, "--out")
                    except KDZooError as e:
                        message = str(e)
                    else:
                        message = f"no error for {target}"
                        break
            except BaseException as e:  # pragma: no cover - reported to the parent
                message = f"child crashed: {e!r}"
            os.write(write, message.encode())
            os._exit(0)
        os.close(write)
        with os.fdopen(read) as f:
            message = f.read()
        os.waitpid(pid, 0)
        assert "cannot be written (Permission denied)" in message, message
        assert not (locked / "sub").exists()
    finally:
        (base / "locked").chmod(0o755)
        import shutil

        shutil.rmtree(base)


def test_a_writable_folder_is_created_and_left_clean(tmp_path):
    out = ensure_writable_dir(tmp_path / "a" / "b", "--out")
    assert out.is_dir() and list(out.iterdir()) == []
