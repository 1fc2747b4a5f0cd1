#!/usr/bin/env bash
# Prepare what benchmarks/device-check.sh needs on the lent GPU machine, which reaches no network:
#
#   .whl/     wheels to install there: airbench 0.1.8 (PyPI has only its source; built here into a
#             pure-Python wheel). Everything else kdzoo needs (torch, torchvision, timm, numpy,
#             pluggy, rich, pyyaml, pytest, setuptools) is in the machine's image (device README, KINDS.md).
#   .data/a/, .data/b/
#             CIFAR-10 ($KDZOO_DATA, verified) as two xz parts of about 58 MiB: one call carries at
#             most 64 MiB (benchmarks/device_data.py).
#
# Both folders are ignored through .git/info/exclude, never committed. Run it once, here:
#   KDZOO_DATA=/path/to/cifar10.npz bash benchmarks/prepare-device.sh
# It prints the two device calls to make (see the top of benchmarks/device-check.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
AIRBENCH=${AIRBENCH_VERSION:-0.1.8}
LIMIT_MIB=64

exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
for path in /.whl/ /.data/; do
  grep -qxF "$path" "$exclude" 2>/dev/null || echo "$path" >>"$exclude"
done

mkdir -p .whl
if ! ls .whl/airbench-"$AIRBENCH"-*.whl >/dev/null 2>&1; then
  echo "building the airbench $AIRBENCH wheel (its PyPI release is a source archive) ..."
  "$PY" -m pip wheel --quiet --no-deps --no-build-isolation -w .whl "airbench==$AIRBENCH" \
    || "$PY" -m pip wheel --quiet --no-deps -w .whl "airbench==$AIRBENCH"
fi
ls -l .whl

if [ -z "${KDZOO_DATA:-}" ] || [ ! -f "$KDZOO_DATA" ]; then
  echo "error: set KDZOO_DATA to cifar10.npz" >&2
  exit 2
fi
if "$PY" - <<'EOF'
import json, pathlib, sys
m = sorted(pathlib.Path(".data").glob("*/MANIFEST.json"))
ok = len(m) == 2 and all((p.parent / json.loads(p.read_text())["part_file"]).is_file() for p in m)
sys.exit(0 if ok else 1)
EOF
then
  echo "CIFAR-10 parts already under .data/ (delete .data/ to pack again)"
else
  echo "packing CIFAR-10 into two parts (verifies, then xz: a few minutes on one core) ..."
  "$PY" benchmarks/device_data.py pack --source "$KDZOO_DATA" --dest .data --parts 2
fi

# What each call carries: the working tree (tracked and untracked-not-ignored files) plus its carry list.
tree=$(git ls-files -z -co --exclude-standard | xargs -0 -r stat -c %s -- 2>/dev/null | awk '{s+=$1} END {print s+0}')
whl=$(du -sb .whl | cut -f1)
status=0
for part in a b; do
  bytes=$(( tree + whl + $(du -sb ".data/$part" | cut -f1) ))
  mib=$(awk -v b="$bytes" 'BEGIN {printf "%.1f", b / 1048576}')
  echo "call carrying .data/$part: $mib MiB (working tree $((tree / 1024)) KiB + .whl + part)"
  if (( bytes > LIMIT_MIB * 1048576 )); then
    echo "error: over the device tool's ${LIMIT_MIB} MiB per call" >&2
    status=1
  fi
done
cat <<'EOF'

Device calls (the second at once after the first: the machine keeps ignored files while warm):
  run(command="bash benchmarks/device-check.sh --steps setup,pytest,cohort --budget 170", carry=[".whl", ".data/a"], timeout_s=240)
  run(command="bash benchmarks/device-check.sh --steps setup,throughput,teacher94,at,quick --budget 310", carry=[".whl", ".data/b"], timeout_s=400)
EOF
exit $status
