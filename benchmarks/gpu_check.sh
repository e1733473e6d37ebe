#!/usr/bin/env bash
# One prepared check for a lent GPU machine (no internet). Run from the repository root:
#
#     OUT=/some/dir bash benchmarks/gpu_check.sh        # (on the device tool, $OUT is set for you)
#
# Stages, each under its own `timeout`, everything logged under $OUT (gpu_check.log is the whole
# console): environment (nvidia-smi, torch, build_info) -> carried wheels -> build the extension in
# place -> GPU tests + kernel tests ($OUT/tests.log) -> benchmark sweep ($OUT/bench: results.csv,
# summary.md, points.jsonl, plots if matplotlib is importable). A failing stage is logged and the
# script goes on. Nothing here changes GPU settings (nvidia-smi is only queried).
#
# Time: the whole script fits GPU_CHECK_TOTAL_S (default 570 s, one 10-minute device call); the
# sweep gets what the build and tests leave, at most SWEEP_MAX_S (default 480 s, about 8 minutes).
# First the host overhead per fused call at N = 256 ($OUT/host_overhead.txt, seconds). Sweep
# order, so that a short budget still gives the headline numbers (each stage gets a share of the
# sweep's time, at most what is left):
#   1. dmlkern (auto backend = Triton on CUDA), every fused pair loss, N = 16384 65536, bf16 + fp32
#   1b. Triton tile settings (python -m dmlkern.bench.tiles), two losses, N = 16384 ($OUT/tiles)
#   1c. the class-weight losses at N = 8192, dmlkern: ArcFace at C = 10,000,000 (bf16), then every
#       class loss at C = 131072 1048576, bf16 + fp32 (T_mm: one N x C x D product)
#   2. dmlkern only, N = 262144, bf16, every fused pair loss
#   3a. dmlkern-compiled (torch.compile of the dmlkern call) at N = 16384, bf16, MS and NT-Xent:
#       against sweep 1's eager dmlkern, what the eager per-op overhead costs where T_mm is ~0.1 ms
#   3c. dmlkern-cpp (CUDA C++), pml (if importable), reference, compile: class losses at C = 131072
#   3. the same for the pair losses at N = 16384 65536
# Knobs (environment): GPU_CHECK_TOTAL_S, SWEEP_MAX_S, BUILD_TIMEOUT_S (300), TEST_TIMEOUT_S (240),
# GPU_CHECK_STAGES ("build tests bench"), PYTHON (python3), MAX_JOBS (16); for a rehearsal on a
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
fi

# ---------------------------------------------------------------- 3. GPU tests + kernel tests
if has_stage tests; then
    KERNEL_TESTS=$(ls tests/test_masked_lse.py tests/test_pair_engine.py tests/test_*kernel*.py tests/test_fused*.py 2>/dev/null | sort -u | tr '\n' ' ')
    T=$(min "${TEST_TIMEOUT_S:-240}" "$(( ($(left) - 150) / 2 ))")
    if [ "$T" -gt 20 ]; then
        # --continue-on-collection-errors: test modules that import pytorch-metric-learning fail to
        # collect when it is not installed; the rest still runs.
        timeout -k 10 "$T" "$PY" -m pytest tests -m gpu -x -q -rs -p no:cacheprovider \
            --continue-on-collection-errors > "$OUT/tests.log" 2>&1
        echo "gpu_check: pytest -m gpu exit $?"
        if [ -n "$KERNEL_TESTS" ]; then
            T=$(min "${TEST_TIMEOUT_S:-240}" "$(( $(left) - 150 ))")
            echo "===== kernel tests: $KERNEL_TESTS" >> "$OUT/tests.log"
            timeout -k 10 "$T" "$PY" -m pytest $KERNEL_TESTS -x -q -rs -p no:cacheprovider >> "$OUT/tests.log" 2>&1
            echo "gpu_check: kernel tests exit $?"
        fi
        tail -n 40 "$OUT/tests.log"
    else
        echo "gpu_check: no time left for the tests"
    fi
fi

# ---------------------------------------------------------------- 4. benchmark sweep
if has_stage bench; then
    BENCH="$OUT/bench"
    PLOTS=""
    "$PY" -c "import matplotlib" 2>/dev/null || { PLOTS="--no-plots"; echo "gpu_check: no matplotlib: plots later with --report-only"; }
    PML=""
    "$PY" -c "import pytorch_metric_learning.losses, pytorch_metric_learning.miners" 2>/dev/null && PML="pml"
    DEV=${BENCH_DEVICE:-cuda}
    NS=${BENCH_N:-16384 65536}
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
    timeout -k 5 150 "$PY" -m dmlkern.bench.host_overhead --device "$DEV" --n 256 --reps 50 \
        --dtype $DT1 > "$OUT/host_overhead.txt" 2>&1
    echo "gpu_check: host overhead exit $?"
    cat "$OUT/host_overhead.txt"
    # 1. the headline: dmlkern at every fused pair loss
    stage 1 34 90 --providers dmlkern --n $NS --dtypes $DTYPES --losses $PAIR
    # 1b. Triton tile settings for two losses at N = 16384: which tiles to make the default
    #     (dmlkern/bench/tiles.py; $OUT/tiles/tiles.md)
    B=$(min $(( SWEEP * 10 / 100 )) "$(( $(sweep_left) - 60 ))")
    if [ "$B" -gt 20 ] && [ "$DEV" = cuda ]; then
        timeout -k 10 $(( B + 60 )) "$PY" -m dmlkern.bench.tiles --device cuda --n 16384 --d 128 \
            --dtypes $DTYPES --budget "$B" --out "$OUT/tiles"
        echo "gpu_check: tile sweep exit $?"
    fi
    # 1c. the class-weight losses at N = 8192: ArcFace at C = 10M (bf16; extra memory <= 2x W?), then
    #     every class loss at C = 131072 1048576, bf16 + fp32
    stage 1c-arcface 8 90 --append --providers dmlkern --classes $BIG_C --dtypes $DT1 --losses arcface
    stage 1c 12 90 --append --providers dmlkern --classes $CLASSES --dtypes $DTYPES --losses $CLASS
    # 2. one N = 262144 run per fused pair loss, dmlkern only
    stage 2 14 90 --append --providers dmlkern --n $BIG --dtypes $DT1 --losses $PAIR
    # 3a. eager overhead: the same calls under torch.compile
    stage 3a 7 120 --append --providers dmlkern-compiled --n $(echo $NS | cut -d' ' -f1) --dtypes $DT1 \
        --losses multi_similarity ntxent
    # 3c, 3. the rest: CUDA C++ backend, PML, the materialising reference, torch.compile: the class
    #    losses at the smallest C (where the materialising paths fit), then the pair losses
    stage 3c 7 90 --append --providers dmlkern-cpp $PML reference compile --classes $(echo $CLASSES | cut -d' ' -f1) \
        --dtypes $DTYPES --losses $CLASS
    stage 3 100 90 --append --providers dmlkern-cpp $PML reference compile --n $NS --dtypes $DTYPES --losses $PAIR
    ls -la "$BENCH"
    cat "$BENCH/summary.md" 2>/dev/null | head -n 200
fi

echo "gpu_check: done in $(( $(date +%s) - T0 ))s"
