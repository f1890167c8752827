#!/usr/bin/env bash
# Everything that needs a CUDA device, in one run of under 10 minutes on one GPU:
#   build    the extension with its CUDA kernels (pip install --no-build-isolation --no-deps -e .)
#   bench    the target benchmarks (`pytest benchmarks -m target`) on the GPU: the ops, then the
#            DMIL step and LSMI scoring, each saving its results JSON, then
#            benchmarks/activation_memory.py (its table appended to bench-step.log); then
#            bench_targets.py judges them
#   tests    the test suite on the GPU (pytest-xdist when installed), with the time that is left;
#            tests/ops, nn, interactions and train first
#
#   DMIL_FAST_COMMIT=<sha> bash benchmarks/gpu_run.sh OUT_DIR [build] [bench] [tests]
#                                                                 (default: all three, in this order)
#
# DMIL_FAST_COMMIT names the commit in the results JSON where the tree has no .git. OUT_DIR
# receives at most eight files: build.log, info.txt, bench-ops.log, bench-step.log, the results
# JSON files, targets.md and tests.log. Each phase has a time limit (GPU_RUN_BUILD_S 150,
# GPU_RUN_OPS_S 180, GPU_RUN_STEP_S 120, GPU_RUN_ACT_S 30, GPU_RUN_TESTS_S 90 seconds: 570 in all),
# and none runs past the deadline of the whole run (GPU_RUN_TOTAL_S, 570 s after the start), so a
# phase that ends early leaves its time to the next ones; pytest is stopped with SIGINT, so a
# benchmark phase cut short still saves what it timed. The benchmark sessions select with
# `-k "$GPU_RUN_KEYWORDS"` (default "not cpu": the GPU cases only, the CPU targets being measured
# on a CPU machine), e.g. GPU_RUN_KEYWORDS="cuda and not compile" for a slice; GPU_RUN_PYTEST_ARGS
# (split on spaces) is added to both, and GPU_RUN_ACT_ARGS to activation_memory.py, e.g.
# "--batch 256". Exit status: the number of phases that failed (0: all passed).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: bash benchmarks/gpu_run.sh OUT_DIR [build] [bench] [tests]}
shift
phases=${*:-build bench tests}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
read -r -a extra <<<"${GPU_RUN_PYTEST_ARGS:-}"
keywords=${GPU_RUN_KEYWORDS:-not cpu}
failed=0
start=$(date +%s)

say() { echo "[gpu_run +$(( $(date +%s) - start ))s] $*"; }

deadline=$(( start + ${GPU_RUN_TOTAL_S:-570} ))

# A command under its phase limit and the run's deadline (15 s kept back for the SIGINT grace):
# SIGINT first (pytest then writes its session-end files), SIGKILL 15 s later; 124 when stopped,
# or at once when the deadline leaves no time.
limited() {
    local seconds=$1 left=$(( deadline - $(date +%s) - 15 ))
    shift
    if [ "$left" -lt "$seconds" ]; then seconds=$left; fi
    if [ "$seconds" -lt 10 ]; then
        say "no time left before the deadline (GPU_RUN_TOTAL_S): not started"
        return 124
    fi
    timeout -s INT -k 15 "$seconds" "$@"
}

phase_failed() { say "FAILED: $1"; failed=$(( failed + 1 )); }

# A pytest phase: exit status 5 (nothing selected) is a failure too, said as such.
pytest_phase() {
    local name=$1 seconds=$2 log=$3; shift 3
    limited "$seconds" "$py" -m pytest "$@" >"$log" 2>&1
    local rc=$?
    if [ "$rc" -eq 5 ]; then
        phase_failed "$name: no test selected (no CUDA device visible, or a selection that matches none)"
    elif [ "$rc" -ne 0 ]; then
        phase_failed "$name (pytest exit status $rc; 124: stopped at its time limit)"
    fi
}

for phase in $phases; do
    case "$phase" in
    build)
        say "build"
        if ! MAX_JOBS=${MAX_JOBS:-$(nproc)} limited "${GPU_RUN_BUILD_S:-150}" \
                "$py" -m pip install --no-build-isolation --no-deps -e . >"$out/build.log" 2>&1; then
            tail -n 30 "$out/build.log"
            phase_failed build
        fi
        { nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv 2>&1
          "$py" -m dmil_fast.info 2>&1; } >"$out/info.txt"
        grep -E "cuda|triton|torch" "$out/info.txt" | head -n 12
        ;;
    tests)
        say "tests"
        xdist=()
        if "$py" -c "import xdist" 2>/dev/null; then xdist=(-n "${GPU_RUN_WORKERS:-8}"); fi
        # The folders with GPU paths first, so that a phase cut short by its time limit has run
        # those; then every other folder and test file of tests/.
        order=(tests/ops tests/nn tests/interactions tests/train)
        for path in tests/*; do
            case " ${order[*]} " in *" $path "*) continue ;; esac
            if [ -d "$path" ] && [ "${path##*/}" != __pycache__ ]; then order+=("$path")
            elif [[ "$path" == tests/test_*.py ]]; then order+=("$path"); fi
        done
        # The CPU emulation of the CUDA kernels is left out: here they run on the GPU itself, and
        # its build (about 40 s) would take that much of the phase in every worker.
        pytest_phase tests "${GPU_RUN_TESTS_S:-90}" "$out/tests.log" -q -p no:cacheprovider "${xdist[@]}" \
            --ignore=tests/ops/test_cuda_kernels_emulated.py "${order[@]}"
        tail -n 15 "$out/tests.log"
        ;;
    bench)
        # Judge only the results JSON of this run: an OUT_DIR used before may hold older ones.
        mapfile -t earlier_json < <(compgen -G "$out/*.json" || true)
        say "bench: ops"
        pytest_phase "bench ops" "${GPU_RUN_OPS_S:-180}" "$out/bench-ops.log" benchmarks -m target -k "$keywords" -q \
            -p no:cacheprovider --ignore=benchmarks/test_bench_dmil_step.py \
            --ignore=benchmarks/test_bench_lsmi.py --bench-save --bench-results-dir "$out" "${extra[@]}"
        tail -n 5 "$out/bench-ops.log"
        say "bench: DMIL step and LSMI"
        pytest_phase "bench step" "${GPU_RUN_STEP_S:-120}" "$out/bench-step.log" \
            benchmarks/test_bench_dmil_step.py benchmarks/test_bench_lsmi.py -m target -k "$keywords" -q \
            -p no:cacheprovider --bench-save --bench-results-dir "$out" "${extra[@]}"
        tail -n 5 "$out/bench-step.log"
        # The activation memory counted from the autograd graph, beside the allocator's numbers
        # in the step's JSON (appended to bench-step.log: no ninth file).
        say "bench: activation memory counted from the graph"
        read -r -a act_args <<<"${GPU_RUN_ACT_ARGS:-}"
        limited "${GPU_RUN_ACT_S:-30}" "$py" benchmarks/activation_memory.py "${act_args[@]}" \
            >"$out/activation.tmp" 2>&1 || phase_failed "activation memory"
        cat "$out/activation.tmp" >>"$out/bench-step.log"
        cat "$out/activation.tmp"
        rm -f "$out/activation.tmp"
        new_json=()
        for f in "$out"/*.json; do
            [[ -f "$f" && ! " ${earlier_json[*]} " =~ " $f " ]] && new_json+=("$f")
        done
        if (( ${#new_json[@]} )); then
            "$py" benchmarks/bench_targets.py "${new_json[@]}" >"$out/targets.md" 2>&1 || phase_failed targets
            cat "$out/targets.md"
        else
            phase_failed "bench (no results JSON was written)"
        fi
        ;;
    *)
        echo "error: unknown phase '$phase' (expected build, bench or tests)" >&2
        exit 64
        ;;
    esac
done
say "done; $failed phase(s) failed"
exit "$failed"
