#!/usr/bin/env bash
# kdzoo on one GPU (issue 13), as one script that writes everything into one folder:
# $OUT when set (the device tool's folder), else runs/device-check/. At most 8 files there, none in
# sub-folders: summary.md, log.txt, pytest-cuda.xml, throughput.json, teacher94.json, cohort.json, bench.md.
#
# Steps, in order of value; each under its own `timeout` (SIGINT, then SIGKILL), all under one time
# budget (--budget, default 470 s), so a step that overruns cannot eat the rest:
#   setup       install kdzoo (editable, offline) and the carried wheels (.whl/: airbench); join the
#               CIFAR-10 parts; print the GPU, driver and versions
#   pytest      pytest -m cuda (tests/test_devices.py on CUDA)                       -> pytest-cuda.xml
#   throughput  benchmarks/throughput.py --device cuda: P1 (vs DataLoader+PIL), P2, P3, P4, P5  -> throughput.json
#   teacher94   airbench94 (2 timed runs after a warm-up), then `kdzoo train --config
#               benchmarks/configs/teacher94.yaml`, timed to 94%                              -> teacher94.json
#   cohort      benchmarks/cohort_gpu.py: engine vs sequential vs CUDA streams vs torch.func stacking
#               vs 4x batch vs torch.compile, 5 resnet20 students          -> cohort.json
#   at          kdzoo bench benchmarks/at-paper-cifar10.yaml: --dry-run (the plan and a time estimate
#               on this GPU), then as much training as fits (SIGINT saves the resume state), then
#               the same command again for a few seconds to show it resumes     -> bench.md
#   quick       kdzoo bench benchmarks/quick.yaml with the full 50,000 training images -> bench.md
#
# On the lent H200 (the device tool's `run`): one call carries at most 64 MiB and CIFAR-10 is 185 MB,
# so benchmarks/prepare-device.sh (run it here once) packs it into two xz parts, .data/a and .data/b,
# and two calls carry one each. The machine keeps ignored files between calls while it is warm (30 s
# after a call): make the second call at once. The first needs no CIFAR-10 (synthetic data).
#
#   run(command="bash benchmarks/device-check.sh --steps setup,pytest,cohort --budget 170",
#       carry=[".whl", ".data/a"], timeout_s=240)
#   run(command="bash benchmarks/device-check.sh --steps setup,throughput,teacher94,at,quick --budget 310",
#       carry=[".whl", ".data/b"], timeout_s=400)
#
# 170 s + 310 s = the issue's 8 minutes; the lowest-value steps get what is left (expected: quick is
# stopped part-way; the summary says so). Expected times, from CPU counts (not measured on a GPU yet):
# setup 15 s, pytest 40 s, cohort 90 s (60 of them torch.compile), throughput 60 s, airbench 25 s,
# teacher94 45-60 s, at 95 s.
#
# If the second call finds a fresh machine (part a gone), its data steps are skipped and say why.
# Anywhere else with a GPU:   KDZOO_DATA=/path/to/cifar10.npz bash benchmarks/device-check.sh
# Smoke test on a CPU:        KDZOO_DATA=/path/to/cifar10.npz bash benchmarks/device-check.sh --dry
#                             (or KDZOO_DEVICE=cpu: tiny sizes, seconds per step)
set -uo pipefail
export PYTHONUNBUFFERED=1 COLUMNS=${COLUMNS:-160} TERM=${TERM:-dumb}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 2

ALL_STEPS="setup,pytest,throughput,teacher94,cohort,at,quick"
STEPS=$ALL_STEPS
BUDGET=470
DRY=0
[ "${KDZOO_DEVICE:-cuda}" = cpu ] && DRY=1
while [ $# -gt 0 ]; do
  case $1 in
    --steps) STEPS=$2; shift 2 ;;
    --budget) BUDGET=$2; shift 2 ;;
    --dry) DRY=1; shift ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
for s in ${STEPS//,/ }; do
  [[ ",$ALL_STEPS," == *",$s,"* ]] || { echo "unknown step '$s'; the steps are $ALL_STEPS" >&2; exit 2; }
done

export PY=${PYTHON:-python3}
export DEVICE=cuda DRY
[ "$DRY" = 1 ] && DEVICE=cpu
export OUTDIR=${OUT:-$ROOT/runs/device-check}
export WORK=${KDZOO_CHECK_WORK:-$ROOT/runs/device-work}  # scratch: bench results, caches (not returned)
export KDZOO_CACHE=$WORK/cache SITE=$WORK/site
export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
export CUBLAS_WORKSPACE_CONFIG=:4096:8  # deterministic cuBLAS for the bit-for-bit tests
mkdir -p "$OUTDIR" "$WORK" "$KDZOO_CACHE"
LOG=$OUTDIR/log.txt SUMMARY=$OUTDIR/summary.md
export BENCH_MD=$OUTDIR/bench.md
START=$SECONDS

# The data: $KDZOO_DATA, else .data/cifar10.npz (joined from the carried parts by `setup`).
if [ -n "${KDZOO_DATA:-}" ] && [ -f "$KDZOO_DATA" ]; then
  export KDZOO_DATA
else
  export KDZOO_DATA=$ROOT/.data/cifar10.npz
fi

{
  echo "# kdzoo device check"
  echo
  echo "$(date -u '+%Y-%m-%d %H:%M UTC'), steps $STEPS, device $DEVICE$([ "$DRY" = 1 ] && echo ' (dry run: tiny sizes)'), budget ${BUDGET} s"
  echo
  echo "| step | status | seconds | limit |"
  echo "|---|---|---|---|"
} >"$SUMMARY"
: >"$LOG"

record() {  # record STEP STATUS SECONDS LIMIT
  echo "| $1 | $2 | $3 | $4 |" >>"$SUMMARY"
  echo "=== [$1] $2 after $3 s" | tee -a "$LOG"
}

have_data() { [ -f "$KDZOO_DATA" ]; }

step() {  # step NAME WANTED_SECONDS FUNCTION [ARGS...]: run FUNCTION under timeout, within the budget
  local name=$1 want=$2
  shift 2
  local left=$((BUDGET - (SECONDS - START)))
  local limit=$((want < left ? want : left)) least=$((want / 4 < 15 ? want / 4 : 15))
  if ((limit < least || limit < 3)); then
    record "$name" "skipped: ${left} s left of the ${BUDGET} s budget" 0 "$want"
    return 0
  fi
  echo "=== [$name] $(date -u +%T), limit ${limit} s: $*" | tee -a "$LOG"
  local t0=$SECONDS rc
  timeout -s INT -k 15 "$limit" bash -c '"$@"' _ "$@" 2>&1 | tee -a "$LOG"
  rc=$?
  local status=ok
  ((rc == 124)) && status="timed out (stopped at the ${limit} s limit)"
  ((rc == 3)) && status="skipped: no CIFAR-10 (see log.txt)"
  ((rc != 0 && rc != 3 && rc != 124)) && status="failed (exit $rc)"
  record "$name" "$status" $((SECONDS - t0)) "$limit"
}

# --------------------------------------------------------------------------- the steps

do_setup() {
  echo "host: $(nproc) CPUs, $(uname -m), python: $($PY -c 'import sys; print(sys.version.split()[0], sys.executable)')"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm \
    --format=csv,noheader
  if ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
      || echo "warning: could not install the carried wheels"
  fi
  if ! $PY -c "import kdzoo, sys; sys.exit(not kdzoo.__file__.startswith('$ROOT/'))" 2>/dev/null; then
    echo "installing kdzoo from $ROOT (editable, offline) ..."
    $PY -m pip install -q --no-deps --no-build-isolation --no-index -e . || kdzoo_shim
  fi
  $PY - <<'EOF' || return 1
import importlib.metadata as md, platform, torch
import kdzoo
from kdzoo.plugins import load_plugins
reg = load_plugins(strict=True)
versions = {n: (md.version(n) if n != "kdzoo" else kdzoo.__version__) for n in ("torch", "torchvision", "timm", "numpy", "pytest", "kdzoo")}
try:
    versions["airbench"] = md.version("airbench")
except md.PackageNotFoundError:
    versions["airbench"] = "not installed"
print("versions:", ", ".join(f"{k} {v}" for k, v in versions.items()), "| python", platform.python_version())
print(f"plugins: {len(reg.methods)} methods, {len(reg.models)} models")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"cuda: {torch.cuda.get_device_name(0)}, {p.total_memory / 2**30:.0f} GiB, capability {p.major}.{p.minor}, "
          f"bf16 {torch.cuda.is_bf16_supported()}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")
else:
    print("cuda: not available")
EOF
  if [ ! -f "$KDZOO_DATA" ]; then
    $PY benchmarks/device_data.py unpack --dest .data || echo "no CIFAR-10 here: the steps that need it will be skipped"
  fi
  if [ "$DEVICE" = cuda ]; then
    $PY -c "import torch, sys; sys.exit(not torch.cuda.is_available())" \
      || { echo "error: no CUDA GPU here; use --dry for the CPU smoke run"; return 1; }
  fi
}

kdzoo_shim() {  # without pip: the sources on PYTHONPATH and a dist-info with kdzoo's entry points
  echo "pip could not install kdzoo; putting the sources on PYTHONPATH with a dist-info for its entry points"
  ln -sfn "$ROOT/kdzoo" "$SITE/kdzoo" && ln -sfn "$ROOT/plugins/kdzoo_plugins" "$SITE/kdzoo_plugins"
  $PY - "$SITE" <<'EOF'
import pathlib, sys, tomllib
meta = tomllib.loads(pathlib.Path("pyproject.toml").read_text())
dist = pathlib.Path(sys.argv[1]) / f"kdzoo-{meta['project']['version']}.dist-info"
dist.mkdir(parents=True, exist_ok=True)
(dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: kdzoo\nVersion: {meta['project']['version']}\n")
groups = meta["project"]["entry-points"] | {"console_scripts": meta["project"]["scripts"]}
(dist / "entry_points.txt").write_text("".join(f"[{g}]\n" + "".join(f"{k} = {v}\n" for k, v in eps.items()) + "\n"
                                               for g, eps in groups.items()))
EOF
}

do_pytest() {
  # a test module that cannot be imported there (a missing optional package) must not stop the GPU tests
  $PY -m pytest -m cuda -q -rA -p no:cacheprovider --continue-on-collection-errors \
    --junitxml "$OUTDIR/pytest-cuda.xml" tests/
}

do_throughput() {
  have_data || { echo "skipped: no CIFAR-10"; return 3; }
  if [ "$DRY" = 1 ]; then
    $PY benchmarks/throughput.py --device cpu --quick --only P1,P2,P3 --json "$OUTDIR/throughput.json"
  else  # windows of 20 steps: 2 steps time launch latency, not throughput, on a GPU
    $PY benchmarks/throughput.py --device cuda --window 20 --windows 5 --warmup 2 --anchor-workers 4,8,12 \
      --json "$OUTDIR/throughput.json"
  fi
}

do_airbench() {
  have_data || { echo "skipped: no CIFAR-10"; return 3; }
  $PY benchmarks/teacher94.py airbench --runs 2 --workdir "$WORK/airbench" --json "$WORK/airbench.json"
}

do_teacher94() {
  have_data || { echo "skipped: no CIFAR-10"; return 3; }
  local extra=(--device "$DEVICE")
  [ "$DRY" = 1 ] && extra+=(--epochs 1 --train-size 256 --test-size 100 --batch-size 64)
  rm -rf "$WORK/teacher94"
  $PY benchmarks/teacher94.py kdzoo --config benchmarks/configs/teacher94.yaml --out "$WORK/teacher94" \
    --json "$WORK/kdzoo94.json" -- "${extra[@]}"
}

do_compare94() {
  $PY benchmarks/teacher94.py compare "$WORK/airbench.json" "$WORK/kdzoo94.json" --json "$OUTDIR/teacher94.json"
}

do_cohort() {
  if [ "$DRY" = 1 ]; then
    $PY benchmarks/cohort_gpu.py --device cpu --members 2 --batch-size 2 --steps 2 --warmup 1 --threads 1 \
      --json "$OUTDIR/cohort.json"
  else
    $PY benchmarks/cohort_gpu.py --device cuda --members 5 --batch-size 128 --steps 30 --warmup 5 --compile \
      --json "$OUTDIR/cohort.json"
  fi
}

derive_yaml() {  # derive_yaml SRC DST KIND: the smoke-sized (dry) or full-training-set variant of a benchmark
  $PY - "$@" <<'EOF'
import sys, yaml
src, dst, kind = sys.argv[1:4]
b = yaml.safe_load(open(src))
if kind == "full-train":  # quick.yaml on all 50,000 training images (the test subset as it was)
    b["data"] = {k: v for k, v in (b.get("data") or {}).items() if k != "train_size"}
    b["name"] = b["name"] + "-full-train"
else:  # smoke: one pair, one seed, one epoch, a few hundred images
    b["data"] = {"train_size": 200, "test_size": 100}
    b["seeds"] = b["seeds"][:1]
    if b.get("pairs"):
        b["pairs"] = b["pairs"][:1]
        b["teachers"] = [t for t in b["teachers"] if (t if isinstance(t, str) else t["model"]) == b["pairs"][0][0]]
        b["students"] = [s for s in b["students"] if (s if isinstance(s, str) else s["model"]) == b["pairs"][0][1]]
    else:
        b["students"] = b["students"][:1]
    b["recipe"] = {**b.get("recipe", {}), "epochs": 1, "schedule": "cosine", "milestones": []}
    b["teacher_recipe"] = {**(b.get("teacher_recipe") or {}), "epochs": 1}
    b["name"] = b["name"] + "-smoke"
yaml.safe_dump(b, open(dst, "w"), sort_keys=False)
EOF
}

bench_report() {  # bench_report TITLE RESULTS_DIR: append the table to bench.md
  {
    echo "## $1"
    echo
    if [ -f "$2/report.md" ]; then cat "$2/report.md"; else echo "(no report: see log.txt)"; fi
    echo
  } >>"$BENCH_MD"
}

do_at() {
  have_data || { echo "skipped: no CIFAR-10"; return 3; }
  local file=benchmarks/at-paper-cifar10.yaml out=$WORK/bench-at
  if [ "$DRY" = 1 ]; then
    file=$WORK/at-smoke.yaml
    derive_yaml benchmarks/at-paper-cifar10.yaml "$file" smoke || return 1
    rm -rf "$out"
  fi
  local rc
  { echo "## kdzoo bench $file --dry-run ($DEVICE)"; echo; echo '```'; } >>"$BENCH_MD"
  timeout -s INT 60 $PY -m kdzoo.cli bench "$file" --dry-run --device "$DEVICE" --out "$out" 2>&1 | tee -a "$BENCH_MD"
  rc=$?
  echo '```' >>"$BENCH_MD"
  ((rc == 0)) || return $rc
  if [ "$DRY" = 1 ]; then
    $PY -m kdzoo.cli bench "$file" --device "$DEVICE" --out "$out"
    rc=$?
  else  # as much as fits: SIGINT after AT_TRAIN_S seconds saves the state; a second run must resume from it
    timeout -s INT -k 20 "${AT_TRAIN_S:-45}" $PY -m kdzoo.cli bench "$file" --device "$DEVICE" --out "$out"
    echo "--- the same command again, for 20 s: it must resume, not restart"
    timeout -s INT -k 20 20 $PY -m kdzoo.cli bench "$file" --device "$DEVICE" --out "$out"
    rc=0  # both are stopped on purpose; the log shows the epochs done and the resume
    find "$out" "$KDZOO_CACHE/teachers" \( -name 'state.pt' -o -name '*.json' \) 2>/dev/null | head -20
  fi
  bench_report "kdzoo bench $file" "$out"
  return $rc
}

do_quick() {
  have_data || { echo "skipped: no CIFAR-10"; return 3; }
  local file=$WORK/quick-full-train.yaml out=$WORK/bench-quick
  if [ "$DRY" = 1 ]; then
    derive_yaml benchmarks/quick.yaml "$file" smoke || return 1
  else
    derive_yaml benchmarks/quick.yaml "$file" full-train || return 1
  fi
  rm -rf "$out"
  $PY -m kdzoo.cli bench "$file" --device "$DEVICE" --out "$out"
  local rc=$?
  bench_report "kdzoo bench $file (quick.yaml, all 50,000 training images)" "$out"
  return $rc
}

export -f do_setup kdzoo_shim do_pytest do_throughput do_airbench do_teacher94 do_compare94 do_cohort derive_yaml \
  bench_report do_at do_quick have_data
export ROOT

# --------------------------------------------------------------------------- run them

: >"$BENCH_MD"
wants() { [[ ",$STEPS," == *",$1,"* ]]; }
if [ "$DRY" = 1 ]; then  # small, but each step still runs its real code path
  wants setup && step setup 120 do_setup
  wants pytest && step pytest 120 do_pytest
  wants throughput && step throughput 240 do_throughput
  wants teacher94 && { step airbench 120 do_airbench; step teacher94 240 do_teacher94; step compare94 30 do_compare94; }
  wants cohort && step cohort 120 do_cohort
  wants at && step at 240 do_at
  wants quick && step quick 240 do_quick
else
  wants setup && step setup 90 do_setup
  wants pytest && step pytest 150 do_pytest
  wants throughput && step throughput 120 do_throughput
  wants teacher94 && { step airbench 90 do_airbench; step teacher94 180 do_teacher94; step compare94 20 do_compare94; }
  wants cohort && step cohort 150 do_cohort
  wants at && step at 150 do_at
  wants quick && step quick 400 do_quick
fi

# --------------------------------------------------------------------------- the results, briefly

echo -e "\nTotal $((SECONDS - START)) s of the ${BUDGET} s budget." >>"$SUMMARY"

$PY - "$OUTDIR" >>"$SUMMARY" 2>>"$LOG" <<'EOF'
import json, pathlib, sys, xml.etree.ElementTree as ET
out = pathlib.Path(sys.argv[1])
print(f"Files: {', '.join(sorted(p.name for p in out.iterdir()))}\n")
x = out / "pytest-cuda.xml"
if x.is_file():
    s = ET.parse(x).getroot()
    s = s if s.tag == "testsuite" else s.find("testsuite")
    print(f"**pytest -m cuda**: {s.get('tests')} tests, {s.get('failures')} failures, {s.get('errors')} errors, "
          f"{s.get('skipped')} skipped, {float(s.get('time', 0)):.0f} s\n")
t = out / "throughput.json"
if t.is_file():
    r = json.loads(t.read_text())
    print(f"**throughput** on {r['machine']['name']} (torch {r['machine']['torch']}, batch {r['settings']['batch_size']}):\n")
    print("| row | what | kdzoo | baseline | ratio | goal | met |\n|---|---|---|---|---|---|---|")
    for row in r["rows"]:
        o, b = row["ours"], row["base"]
        print(f"| {row['key']} | {row['what']} | {o['median']:,.0f} {o['unit']} | {b['median']:,.0f} {b['unit']} ({b['label']}) "
              f"| {row['ratio_text']} | {row['goal']} | {row['met']} |")
    print()
c = out / "teacher94.json"
if c.is_file():
    r = json.loads(c.read_text())
    a, k = r["airbench"], r["kdzoo"]
    print("**time to 94%**:")
    if a.get("status") == "ok":
        print(f"- airbench94 {a.get('version')}: {a['mean_total_s']:.2f} s (train {a['mean_train_s']:.2f} s + TTA), "
              f"{a['mean_top1_tta']:.2f}% with TTA, {a['mean_top1']:.2f}% without, {len(a['runs'])} runs")
    else:
        print(f"- airbench94: {a.get('status')}: {a.get('reason')}")
    if k.get("status") == "ok":
        reached = k.get("reached")
        print(f"- kdzoo teacher94: {k['epochs']} epochs, {k['train_s']:.1f} s training, {k['wall_s']:.1f} s wall, "
              f"last {k['last_top1']:.2f}%, best {k['best_top1']:.2f}%, "
              + (f"94% at epoch {reached['epoch']} after {reached['train_s']:.1f} s" if reached else "94% not reached"))
    else:
        print(f"- kdzoo teacher94: {k.get('status')}: {k.get('reason') or k.get('error')}")
    if r.get("ratio") is not None:
        print(f"- ratio {r['ratio']:.1f}x (goal <= {r['goal_ratio']:g}x)")
    print()
h = out / "cohort.json"
if h.is_file():
    r = json.loads(h.read_text())
    print(f"**cohort options** ({r['members']} x {r['student']} <- {r['teacher']}, batch {r['batch_size']}, {r['name']}; "
          f"ops per member step {r['ops']['member_step']}, teacher forward {r['ops']['teacher_forward']}):\n")
    for k, v in r["rates"].items():
        rel = r["relative_to_sequential"].get(k)
        print(f"- {k}: {v:,.0f} member-img/s" + (f" ({rel:.2f}x sequential)" if rel else ""))
    for k, v in r["errors"].items():
        print(f"- {k}: failed: {v}")
    if "stacked_vs_sequential_max_abs_diff" in r:
        print(f"- stacked vs sequential logits, max |diff| {r['stacked_vs_sequential_max_abs_diff']:.3g}")
    print()
EOF

# The device tool returns files of at most 16 MiB.
if [ "$(stat -c %s "$LOG")" -gt $((15 * 1048576)) ]; then
  tail -c $((15 * 1048576)) "$LOG" >"$LOG.tmp" && mv "$LOG.tmp" "$LOG"
fi
echo
cat "$SUMMARY"
grep -q "failed\|timed out" "$SUMMARY" && exit 1
exit 0
