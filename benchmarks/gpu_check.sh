#!/usr/bin/env bash
# One prepared check for a lent GPU machine (no internet). Run from the repository root:
#
#     OUT=/some/dir bash benchmarks/gpu_check.sh        # (on the device tool, $OUT is set for you)
#
# Stages, each under its own `timeout`, everything logged under $OUT (gpu_check.log is the whole
# console): environment (nvidia-smi, torch, build_info) -> carried wheels (.device_carry/*.whl, e.g.
# pytorch-metric-learning) -> build the extension in place -> the tests marked gpu ($OUT/tests.log)
# -> benchmark sweep ($OUT/bench: results.csv, summary.md, points.jsonl, plots if matplotlib is
# importable). A failing stage is logged and the script goes on. Nothing here changes GPU settings
# (nvidia-smi is only queried). With GPU_CHECK_ARCHIVE=FILE, $OUT is packed into FILE after each
# stage (the device tool returns at most 8 files, and a run killed at its limit keeps the last pack).
#
# Time: the whole script fits GPU_CHECK_TOTAL_S (default 570 s, one 10-minute device call); the
# sweep gets what the build and tests leave, at most SWEEP_MAX_S (default 480 s, about 8 minutes).
# First the host overhead per fused call at N = 256 ($OUT/host_overhead.txt). Then, in order, so
# that a short lease still answers the issues' GPU targets (each stage gets a share of the sweep's
# time, at most what is left):
#   1a. ArcFace at N = 8192, C = 10,000,000, bf16, dmlkern (extra memory against the size of W)
#   1.  dmlkern (auto backend = Triton on CUDA), every fused pair loss, N = 8192 65536, bf16
#   3.  pml (if importable) and the materialising reference at the same points
#   1c. every class-weight loss at N = 8192, C = 131072 1048576, bf16 (T_mm: one N x C x D
#       product); 3c pml and the reference at C = 131072
#   1f. sweeps 1 and 1c in fp32
#   2.  dmlkern only, N = 262144, bf16, every fused pair loss
#   1b. Triton tile settings (python -m dmlkern.bench.tiles), two losses, N = 16384 ($OUT/tiles)
#   3a. dmlkern-compiled (torch.compile of the dmlkern call) at N = 8192, bf16, MS and NT-Xent:
#       against sweep 1's eager dmlkern, what the eager per-op overhead costs where T_mm is ~0.1 ms
#   4.  dmlkern-cpp (CUDA C++) and compile (torch.compile of the reference), the pair losses
# Knobs (environment): GPU_CHECK_TOTAL_S, SWEEP_MAX_S, BUILD_TIMEOUT_S (300), TEST_TIMEOUT_S (240),
# GPU_CHECK_STAGES ("build tests bench"), GPU_TESTS (test paths, "tests"), TEST_MAXFAIL (200),
# PYTHON (python3), MAX_JOBS (16), TEST_WORKERS (8); for a rehearsal on a
# CPU machine: BENCH_DEVICE=cpu BENCH_N="64 128" BENCH_BIG_N=256 BENCH_DTYPES=fp32 BENCH_CLASS_N=64
# BENCH_CLASSES="1024 4096" BENCH_BIG_C=16384 GPU_CHECK_STAGES=bench.
# Afterwards, plots can be (re)drawn anywhere with matplotlib:
#     python -m dmlkern.bench --report-only --out <fetched $OUT/bench>

set -u
T0=$(date +%s)
OUT=${OUT:-$PWD/.bench_out/gpu_check}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
set -x

PY=${PYTHON:-python3}
TOTAL=${GPU_CHECK_TOTAL_S:-570}
SWEEP_MAX=${SWEEP_MAX_S:-480}
STAGES=${GPU_CHECK_STAGES:-build tests bench}
export MAX_JOBS=${MAX_JOBS:-16}
unset TRITON_INTERPRET DMLKERN_BACKEND
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

left() { echo $(( TOTAL - ($(date +%s) - T0) )); }
min() { if [ "$1" -lt "$2" ]; then echo "$1"; else echo "$2"; fi; }
has_stage() { case " $STAGES " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
# GPU_CHECK_ARCHIVE=FILE: after each stage, $OUT as one .tar.gz at FILE (outside $OUT), so that a
# run stopped from outside still leaves everything it had written in one file
ARCHIVE=${GPU_CHECK_ARCHIVE:-}
snapshot() {
    if [ -n "$ARCHIVE" ]; then
        tar czf "$ARCHIVE.part" -C "$OUT" . 2>/dev/null; mv -f "$ARCHIVE.part" "$ARCHIVE"
    fi
}

# ---------------------------------------------------------------- 0. environment (queries only)
timeout -k 5 30 nvidia-smi
timeout -k 5 30 nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,clocks.sm,clocks.max.sm,power.draw,temperature.gpu --format=csv
timeout -k 5 30 nvcc --version
timeout -k 5 60 "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'gpu', torch.cuda.is_available() and torch.cuda.get_device_name(0))"
timeout -k 5 60 "$PY" -c "import dmlkern, json; print(json.dumps(dmlkern.build_info(), indent=1))"

# ---------------------------------------------------------------- 1. wheels carried in (offline)
DEPS=/tmp/dmlkern_device_deps
if ls .device_carry/*.whl >/dev/null 2>&1; then
    timeout -k 5 180 "$PY" -m pip install --no-deps --no-index --target "$DEPS" .device_carry/*.whl \
        > "$OUT/pip.log" 2>&1 || echo "gpu_check: installing the carried wheels failed (see pip.log)"
    export PYTHONPATH="$PYTHONPATH:$DEPS"
fi

# ---------------------------------------------------------------- 2. build the extension in place
if has_stage build; then
    T=$(min "${BUILD_TIMEOUT_S:-300}" "$(( $(left) - 120 ))")
    if [ "$T" -gt 30 ]; then
        TORCH_CUDA_ARCH_LIST=9.0 timeout -k 10 "$T" "$PY" setup.py build_ext --inplace > "$OUT/build.log" 2>&1
        echo "gpu_check: build exit $?"
        tail -n 30 "$OUT/build.log"
    else
        echo "gpu_check: no time left to build"
    fi
    timeout -k 5 60 "$PY" -c "import dmlkern, json; print(json.dumps(dmlkern.build_info(), indent=1))" | tee "$OUT/build_info.json"
    snapshot
fi

# ---------------------------------------------------------------- 3. GPU tests
# Only the tests marked gpu (their CPU twins run in CI), spread over pytest-xdist workers when it is
# importable (Triton compiles on the host's cores), every failure listed rather than the first.
if has_stage tests; then
    RESERVE=10
    has_stage bench && RESERVE=150  # the sweep's minimum
    T=$(min "${TEST_TIMEOUT_S:-240}" "$(( $(left) - RESERVE ))")
    if [ "$T" -gt 20 ]; then
        XDIST=""
        "$PY" -c "import xdist" 2>/dev/null && XDIST="-n ${TEST_WORKERS:-8}"
        # --continue-on-collection-errors: test modules that import pytorch-metric-learning fail to
        # collect when it is not installed; the rest still runs.
        timeout -k 10 "$T" "$PY" -m pytest ${GPU_TESTS:-tests} -m gpu -q -rfEs --tb=short --maxfail="${TEST_MAXFAIL:-200}" -p no:cacheprovider \
            $XDIST --continue-on-collection-errors > "$OUT/tests.log" 2>&1
        echo "gpu_check: pytest -m gpu exit $?"
        tail -n 60 "$OUT/tests.log"
    else
        echo "gpu_check: no time left for the tests"
    fi
    snapshot
fi

# ---------------------------------------------------------------- 4. benchmark sweep
if has_stage bench; then
    BENCH="$OUT/bench"
    PLOTS=""
    "$PY" -c "import matplotlib" 2>/dev/null || { PLOTS="--no-plots"; echo "gpu_check: no matplotlib: plots later with --report-only"; }
    PML=""
    "$PY" -c "import pytorch_metric_learning.losses, pytorch_metric_learning.miners" 2>/dev/null && PML="pml"
    DEV=${BENCH_DEVICE:-cuda}
    NS=${BENCH_N:-8192 65536}
    BIG=${BENCH_BIG_N:-262144}
    DTYPES=${BENCH_DTYPES:-bf16 fp32}
    DT1=$(echo $DTYPES | cut -d' ' -f1)
    CLASS_N=${BENCH_CLASS_N:-8192}
    CLASSES=${BENCH_CLASSES:-131072 1048576}
    BIG_C=${BENCH_BIG_C:-10000000}
    PAIR=$("$PY" -c "from dmlkern.bench.specs import LOSSES; print(*(k for k, v in LOSSES.items() if not v.classes))")
    CLASS=$("$PY" -c "from dmlkern.bench.specs import LOSSES; print(*(k for k, v in LOSSES.items() if v.classes))")
    COMMON="--device $DEV --d 128 --repeats 10 --warmup 2 --time-limit 30 --class-time-limit 30 --compile-limit 120
            --class-n $CLASS_N --no-progress $PLOTS --out $BENCH"
    SWEEP=$(min "$SWEEP_MAX" "$(( $(left) - 30 ))")
    S0=$(date +%s)
    sweep_left() { echo $(( SWEEP - ($(date +%s) - S0) )); }
    # stage NAME PERCENT GRACE ARGS...: dmlkern.bench ARGS with a budget of PERCENT % of the sweep (at
    # most what is left less 30 s; skipped under 20 s) and a hard timeout of that budget + GRACE
    stage() {
        local name=$1 grace=$3 b
        b=$(min $(( SWEEP * $2 / 100 )) "$(( $(sweep_left) - 30 ))")
        shift 3
        if [ "$b" -gt 20 ]; then
            timeout -k 10 $(( b + grace )) "$PY" -m dmlkern.bench $COMMON --budget "$b" "$@"
            echo "gpu_check: sweep $name exit $?"
        fi
    }
    echo "gpu_check: sweep budget ${SWEEP}s"

    # 0. host overhead: each fused loss at a tiny batch (kernels ~free), ops per call and time per
    #    call with the launches (dmlkern/bench/host_overhead.py; compiles the kernels sweep 1 uses)
    timeout -k 5 90 "$PY" -m dmlkern.bench.host_overhead --device "$DEV" --n 256 --reps 50 \
        --dtype $DT1 > "$OUT/host_overhead.txt" 2>&1
    echo "gpu_check: host overhead exit $?"
    cat "$OUT/host_overhead.txt"
    # The issues' GPU targets first, so that a short lease still answers them:
    # 1a. ArcFace at N = 8192, C = 10,000,000, bf16 (extra memory <= 2x W? PML cannot hold the logits)
    stage 1a-arcface 8 90 --providers dmlkern --classes $BIG_C --dtypes $DT1 --losses arcface
    snapshot
    # 1. every fused pair loss at the targets' N and dtype (ratios to T_mm). The first run (2026-12-04)
    #    swept bf16 and fp32 together: fp32 at N = 65536 (0.35-0.5 s a call) used the stage's budget
    #    after five losses, so fp32 now comes after the PML ratios.
    stage 1 25 90 --append --providers dmlkern --n $NS --dtypes $DT1 --losses $PAIR
    snapshot
    # 3. PML and the materialising reference at the same points (the "x faster than PML" ratios)
    stage 3 15 90 --append --providers $PML reference --n $NS --dtypes $DT1 --losses $PAIR
    snapshot
    # 1c. every class loss at C = 131072 1048576, then PML and the reference at the smallest C
    stage 1c 10 90 --append --providers dmlkern --classes $CLASSES --dtypes $DT1 --losses $CLASS
    snapshot
    stage 3c 7 90 --append --providers $PML reference --classes $(echo $CLASSES | cut -d' ' -f1) \
        --dtypes $DT1 --losses $CLASS
    snapshot
    # 1f. the other dtypes (fp32)
    REST=$(echo $DTYPES | cut -s -d' ' -f2-)
    if [ -n "$REST" ]; then
        stage 1f 10 90 --append --providers dmlkern --n $NS --dtypes $REST --losses $PAIR
        stage 1cf 5 90 --append --providers dmlkern --classes $CLASSES --dtypes $REST --losses $CLASS
        snapshot
    fi
    # 2. one large-N run per fused pair loss, dmlkern only
    stage 2 10 90 --append --providers dmlkern --n $BIG --dtypes $DT1 --losses $PAIR
    snapshot
    # 1b. Triton tile settings for two losses at N = 16384: which tiles to make the default
    #     (dmlkern/bench/tiles.py; $OUT/tiles/tiles.md)
    B=$(min $(( SWEEP * 8 / 100 )) "$(( $(sweep_left) - 60 ))")
    if [ "$B" -gt 20 ] && [ "$DEV" = cuda ]; then
        timeout -k 10 $(( B + 60 )) "$PY" -m dmlkern.bench.tiles --device cuda --n 16384 --d 128 \
            --dtypes $DTYPES --budget "$B" --out "$OUT/tiles"
        echo "gpu_check: tile sweep exit $?"
    fi
    # 3a. eager overhead: the same calls under torch.compile
    stage 3a 7 120 --append --providers dmlkern-compiled --n $(echo $NS | cut -d' ' -f1) --dtypes $DT1 \
        --losses multi_similarity ntxent
    # 4. the rest: the CUDA C++ backend and torch.compile of the reference
    stage 4 100 90 --append --providers dmlkern-cpp compile --n $NS --dtypes $DTYPES --losses $PAIR
    snapshot
    ls -la "$BENCH"
    cat "$BENCH/summary.md" 2>/dev/null | head -n 200
fi

echo "gpu_check: done in $(( $(date +%s) - T0 ))s"
snapshot
