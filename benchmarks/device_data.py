"""CIFAR-10 for the lent GPU machine, in parts small enough to travel.

    python benchmarks/device_data.py pack [--source cifar10.npz] [--dest .data] [--parts 2]
    python benchmarks/device_data.py unpack [--dest .data]

The device tool carries at most 64 MiB per call, and CIFAR-10 is 185 MB (170 MB as a deflated
``.npz``). ``pack`` verifies the source (kdzoo's sha256 fingerprints), writes it as an
uncompressed ``.npz``, compresses that with xz (a delta filter over the RGB bytes: about 0.66 of
the raw size, against 0.92 for the deflated file) and cuts the result into ``--parts`` equal
parts, ``DEST/a/``, ``DEST/b/``, ..., each with a ``MANIFEST.json``. Each call of the device tool
carries one part; the machine keeps ignored files between calls while it stays warm.

``unpack`` joins the parts found under ``DEST``, checks the sha256 of the joined stream, and
writes ``DEST/cifar10.npz`` (kdzoo verifies every array again when it loads it). Exit status 0
when the file is there (or already was), 3 when parts are missing (it says which).
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import lzma
import os
import string
import sys
from pathlib import Path
from typing import Any

import numpy as np

FILTERS = [{"id": lzma.FILTER_DELTA, "dist": 3}, {"id": lzma.FILTER_LZMA2, "preset": 6}]
NAME = "cifar10.npz"
PART = NAME + ".xz.part"
MISSING = 3


def pack(source: str, dest: Path, parts: int, verify: bool = True) -> list[Path]:
    """Write ``parts`` folders under ``dest`` holding the xz-compressed ``.npz``; returns the part files."""
    if not 1 <= parts <= 26:
        raise ValueError("parts must be between 1 and 26")
    if verify:
        from kdzoo_plugins.cifar10 import load_cifar10

        load_cifar10(source)  # raises unless every array matches CIFAR-10's fingerprints
    with np.load(source, allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    raw = buf.getvalue()
    packed = lzma.compress(raw, format=lzma.FORMAT_XZ, filters=FILTERS)
    digest = hashlib.sha256(packed).hexdigest()
    size = -(-len(packed) // parts)
    files = []
    for i in range(parts):
        folder = dest / string.ascii_lowercase[i]
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.glob(PART + "*"):
            old.unlink()
        path = folder / f"{PART}{i:02d}"
        path.write_bytes(packed[i * size:(i + 1) * size])
        (folder / "MANIFEST.json").write_text(json.dumps({
            "file": NAME, "part": i, "parts": parts, "part_file": path.name, "part_bytes": path.stat().st_size,
            "xz_bytes": len(packed), "xz_sha256": digest, "npz_bytes": len(raw),
        }, indent=1))
        files.append(path)
    return files


def _manifests(dest: Path) -> list[dict[str, Any]]:
    found = []
    for m in sorted(dest.glob("*/MANIFEST.json")):
        info = json.loads(m.read_text())
        info["path"] = m.parent / info["part_file"]
        found.append(info)
    return found


def unpack(dest: Path) -> tuple[bool, str]:
    """Join the parts under ``dest`` into ``dest/cifar10.npz``; ``(ok, message)``."""
    target = dest / NAME
    found = _manifests(dest)
    if target.is_file() and (not found or target.stat().st_size == found[0]["npz_bytes"]):
        return True, f"{target} is there ({target.stat().st_size:,} bytes)"
    if not found:
        return False, f"no parts under {dest} (expected {dest}/a/MANIFEST.json, ...): run benchmarks/prepare-device.sh"
    digests = {m["xz_sha256"] for m in found}
    if len(digests) > 1:
        return False, f"parts under {dest} come from different packings ({len(digests)}): pack again"
    want = found[0]["parts"]
    have = {m["part"]: m for m in found if m["path"].is_file() and m["path"].stat().st_size == m["part_bytes"]}
    absent = [string.ascii_lowercase[i] for i in range(want) if i not in have]
    if absent:
        return False, (f"parts {', '.join(absent)} of {want} are missing under {dest} (a fresh machine keeps nothing "
                       "from an earlier call: carry every part, one per call, in calls that follow each other)")
    corrupt = f"the joined parts under {dest} are corrupt: pack and carry them again"
    sha = hashlib.sha256()
    for i in range(want):
        with open(have[i]["path"], "rb") as f:
            while chunk := f.read(1 << 22):
                sha.update(chunk)
    if sha.hexdigest() != found[0]["xz_sha256"]:
        return False, corrupt + " (sha256 mismatch)"
    dec = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
    tmp = target.with_suffix(".npz.tmp")
    try:
        with open(tmp, "wb") as out:
            for i in range(want):
                with open(have[i]["path"], "rb") as f:
                    while chunk := f.read(1 << 22):
                        out.write(dec.decompress(chunk))
        if not dec.eof:
            raise lzma.LZMAError("truncated stream")
    except lzma.LZMAError as e:
        tmp.unlink(missing_ok=True)
        return False, f"{corrupt} ({e})"
    os.replace(tmp, target)
    return True, f"joined {want} parts into {target} ({target.stat().st_size:,} bytes)"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    a = sub.add_parser("pack", help="verify, compress and split cifar10.npz")
    a.add_argument("--source", default=os.environ.get("KDZOO_DATA", ""), help="cifar10.npz (default: $KDZOO_DATA)")
    a.add_argument("--dest", default=".data")
    a.add_argument("--parts", type=int, default=2)
    a.add_argument("--no-verify", action="store_true", help="skip the fingerprint check (tests)")
    u = sub.add_parser("unpack", help="join the parts into DEST/cifar10.npz")
    u.add_argument("--dest", default=".data")
    args = p.parse_args(argv)
    if args.what == "pack":
        if not args.source:
            p.error("set KDZOO_DATA or pass --source")
        for f in pack(args.source, Path(args.dest), args.parts, verify=not args.no_verify):
            print(f"{f}  {f.stat().st_size / 2**20:.1f} MiB")
        return 0
    ok, message = unpack(Path(args.dest))
    print(message, file=sys.stdout if ok else sys.stderr)
    return 0 if ok else MISSING


if __name__ == "__main__":
    sys.exit(main())
