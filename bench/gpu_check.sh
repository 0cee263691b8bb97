#!/usr/bin/env bash
# The prepared GPU check: on a fresh GPU machine, build bc_fast with its CUDA module (and the fused sm_90a
# kernels when CUTLASS's headers are at hand), check each variant of the fused kernel against float64 in a
# process of its own (bench/sm90_variant_check.py: a variant that faults or hangs takes nothing else down),
# run the GPU tests, time the kernels against torch eager and torch.compile with per-kernel profiles
# (bench/gpu_kernels.py --quick; the variants found correct beside the default), time the GPU pipeline
# (bench/bench_gpu.py: table conversion), and print one summary table. Meant to finish within 8 minutes.
# Under the device tool, kernels.json/.log land in $OUT.
#
# Needs: Python 3.12 with PyTorch (CUDA 13), nvcc, CMake, pybind11, scikit-build-core, numpy, safetensors,
# pytest. No network: nothing is downloaded. Optional: scipy-openblas32 (else the CPU core is built with
# -DBC_FAST_BLAS=OFF), faiss (else the index tests skip; with GPU support, the GPU index tests and the
# index_search benchmark run too), pyarrow, tqdm, and CUTLASS's headers for the fused sm_90a kernels:
# BC_FAST_CUTLASS_DIR, an importable nvidia-cutlass, or its wheel carried in .whl/ (nvidia_cutlass-*.whl,
# unpacked here; else the fused kernels are not built). Other wheels in .whl/ (scipy-openblas32, zlib-ng,
# faiss-cpu: bc_fast's dependencies that the GPU image lacks) are installed with --no-deps before the build.
# cuBLASLt comes from the CUDA toolkit, or else from the nvidia-cublas wheel torch depends on.
#
# Usage: bench/gpu_check.sh            (PYTHON=python3.12 to pick the interpreter)
# Exit status: 0 all steps ran and passed (benchmark targets may still show MISS), 1 a step failed,
# 2 no GPU here (nothing was built).
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
PY=${PYTHON:-python3}
START=$(date +%s)
BUDGET=${GPU_CHECK_BUDGET_S:-480}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/bc_fast_gpu_check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
ROWS=()

elapsed() { echo $(( $(date +%s) - START )); }
left() { local l=$(( BUDGET - $(elapsed) )); (( l < 30 )) && l=30; echo "$l"; }
say() { echo "== gpu_check [$(elapsed)s]: $*"; }
row() { ROWS+=("| $1 | $2 | $3 | $4 |"); }  # step | status | seconds | detail
# bench_row STEP RC T MET: a benchmark step's row (PASS when it exited 0; FAIL sets FAILED).
bench_row() {
  if (( $2 == 0 )); then
    row "$1" PASS $(( $(elapsed) - $3 )) "${4:-no summary line}"
  else
    FAILED=1
    row "$1" FAIL $(( $(elapsed) - $3 )) "exit $2 (124: out of time); ${4:-no summary line}"
  fi
}

summary() {
  echo
  echo "## bc_fast GPU check summary ($(elapsed) s in all)"
  echo
  echo "| step | status | s | detail |"
  echo "|---|---|---|---|"
  printf '%s\n' "${ROWS[@]}"
  for t in bench pipeline; do
    if [[ -s $WORK/$t.table ]]; then
      echo
      cat "$WORK/$t.table"
    fi
  done
}

# ---------------------------------------------------------------- 0. is there a GPU at all?
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  echo "gpu_check: no GPU: nvidia-smi is missing or lists no NVIDIA GPU on this machine; nothing was built or run" >&2
  exit 2
fi
GPU_NAME=$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | head -1)
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "gpu_check: no GPU: nvidia-smi lists '$GPU_NAME' but torch cannot use it (torch.cuda.is_available() is False, or no torch)" >&2
  exit 2
fi
say "GPU: $GPU_NAME; $("$PY" -c 'import sys, torch; print(f"Python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda})")')"
row "gpu" PASS "$(elapsed)" "$GPU_NAME"

# ---------------------------------------------------------------- 1. toolchain, BLAS, cuBLAS, libraries
if ! command -v nvcc >/dev/null; then
  for d in /usr/local/cuda/bin /usr/local/cuda-13*/bin; do [[ -x "$d/nvcc" ]] && PATH="$d:$PATH" && break; done
fi
if ! command -v nvcc >/dev/null; then
  row "toolchain" FAIL "$(elapsed)" "nvcc not found (PATH, /usr/local/cuda/bin)"; summary; exit 1
fi
export CUDACXX=${CUDACXX:-$(command -v nvcc)}
NVCC_VER=$(nvcc --version | sed -n 's/.*release \([0-9.]*\).*/\1/p')
# Wheels carried in .whl/ other than CUTLASS's (the GPU image lacks some of bc_fast's dependencies:
# scipy-openblas32, zlib-ng, faiss-cpu), installed into this interpreter's environment with --no-deps,
# before the BLAS check and the build, so that the build and the runs are what a user's install gives.
EXTRA_WHL=()
for w in "$ROOT"/.whl/*.whl; do [[ -f $w && ${w##*/} != nvidia_cutlass-* ]] && EXTRA_WHL+=("$w"); done
if (( ${#EXTRA_WHL[@]} )); then
  WOK=() WBAD=()
  for w in "${EXTRA_WHL[@]}"; do  # one at a time: a wheel this interpreter cannot take stops no other
    WPIP=("$PY" -m pip install -q --no-index --no-deps --no-compile "$w")
    "${WPIP[@]}" >>"$WORK/wheels.log" 2>&1
    RC=$?
    if (( RC != 0 )) && grep -q "externally-managed-environment" "$WORK/wheels.log"; then
      "${WPIP[@]}" --break-system-packages >>"$WORK/wheels.log" 2>&1
      RC=$?
    fi
    if (( RC == 0 )); then WOK+=("${w##*/}"); else WBAD+=("${w##*/}"); fi
  done
  if (( ${#WBAD[@]} == 0 )); then
    row "wheels" PASS "$(elapsed)" "installed from .whl/: ${WOK[*]}"
  else
    tail -5 "$WORK/wheels.log"
    row "wheels" FAIL "$(elapsed)" "not installed: ${WBAD[*]} (pip's last lines above); installed: ${WOK[*]:-none}"
  fi
fi
BLAS=ON
"$PY" -c "import scipy_openblas32" 2>/dev/null || BLAS=OFF
# cuBLASLt: the toolkit's, else a wheel's (nvidia/cu13 for CUDA 13 wheels, nvidia/cublas for older ones).
CUBLAS_ARGS=()
CUDA_INC=""
for d in "$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")/include" "${CUDA_HOME:-/usr/local/cuda}/include" \
         /usr/local/cuda/targets/x86_64-linux/include; do
  [[ -f $d/cublasLt.h ]] && CUDA_INC=$d && break
done
if [[ -n $CUDA_INC ]]; then
  CUBLAS_FROM="toolkit $CUDA_INC"
else
  CUBLAS_ROOT=$("$PY" - <<'PY'
import glob, os, sys
for d in sys.path:
    for sub in ("nvidia/cu13", "nvidia/cublas"):
        p = os.path.join(d, sub)
        if os.path.isfile(os.path.join(p, "include", "cublasLt.h")) and glob.glob(os.path.join(p, "lib", "libcublasLt.so*")):
            print(p); sys.exit(0)
sys.exit(1)
PY
  ) || { row "toolchain" FAIL "$(elapsed)" "no cublasLt.h in the CUDA toolkit nor in an nvidia-cublas wheel (pip install nvidia-cublas)"; summary; exit 1; }
  CUBLAS_FROM="wheel $CUBLAS_ROOT"
  CUBLAS_ARGS=(-C "cmake.define.BC_FAST_CUBLAS_ROOT=$CUBLAS_ROOT")
fi
# The wheels' shared libraries (libcudart, libcublasLt) for the extension, wherever pip put them.
NV_LIBS=$("$PY" -c "import glob, os, sys; print(':'.join(sorted({os.path.dirname(p) for d in sys.path for p in glob.glob(os.path.join(d, 'nvidia', '*', 'lib', 'lib*.so*'))})))")
export LD_LIBRARY_PATH="${NV_LIBS}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
# CUTLASS headers for the fused sm_90a kernels: given, importable, or unpacked from a carried wheel.
CUTLASS_DIR=${BC_FAST_CUTLASS_DIR:-}
if [[ -z $CUTLASS_DIR ]]; then
  CUTLASS_DIR=$("$PY" -c "import importlib.util, os; s = importlib.util.find_spec('cutlass_library'); print(os.path.join(list(s.submodule_search_locations)[0], 'source'))" 2>/dev/null) || CUTLASS_DIR=""
fi
if [[ -z $CUTLASS_DIR ]]; then
  WHL=$(ls "$ROOT"/.whl/nvidia_cutlass-*.whl 2>/dev/null | head -1)
  if [[ -n $WHL ]]; then
    "$PY" -c "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])" "$WHL" "$WORK/cutlass" &&
      CUTLASS_DIR=$WORK/cutlass/cutlass_library/source
  fi
fi
CUTLASS_ARGS=()
if [[ -n $CUTLASS_DIR && -f $CUTLASS_DIR/include/cutlass/cutlass.h ]]; then
  CUTLASS_ARGS=(-C "cmake.define.BC_FAST_CUTLASS_DIR=$CUTLASS_DIR")
  CUTLASS_FROM=$CUTLASS_DIR
else
  CUTLASS_FROM="none: the fused sm_90a kernels are not built"
fi
FAISS=$("$PY" -c "
import faiss
gpus = faiss.get_num_gpus() if hasattr(faiss, 'StandardGpuResources') else 0
print(f'faiss {faiss.__version__}: ' + (f'GPU build, {gpus} GPU(s): the GPU legacy index tests and index_search run' if gpus
      else 'no GPU support: the GPU legacy index tests and index_search do not run (no faiss GPU build here)'))
" 2>/dev/null) || FAISS="faiss not importable: the index tests skip (carry the faiss-cpu wheel in .whl/)"
row "faiss" INFO 0 "$FAISS"
say "nvcc $NVCC_VER, BC_FAST_BLAS=$BLAS, cuBLASLt from $CUBLAS_FROM, CUTLASS from $CUTLASS_FROM; $FAISS"
row "toolchain" PASS "$(elapsed)" "nvcc $NVCC_VER; BLAS=$BLAS; cuBLASLt: $CUBLAS_FROM; CUTLASS: $CUTLASS_FROM"

# ---------------------------------------------------------------- 2. build and install with CUDA
say "building (log: $WORK/build.log)"
T=$(elapsed)
PIP=("$PY" -m pip install --no-build-isolation --no-deps --no-index -v . -C cmake.define.BC_FAST_CUDA=ON
     -C "cmake.define.BC_FAST_BLAS=$BLAS" -C build-dir=build/gpu_check "${CUBLAS_ARGS[@]}" "${CUTLASS_ARGS[@]}")
timeout "$(left)" "${PIP[@]}" >"$WORK/build.log" 2>&1
RC=$?
if (( RC != 0 )) && grep -q "externally-managed-environment" "$WORK/build.log"; then
  timeout "$(left)" "${PIP[@]}" --break-system-packages >"$WORK/build.log" 2>&1
  RC=$?
fi
if (( RC != 0 )); then
  tail -40 "$WORK/build.log"
  row "build" FAIL $(( $(elapsed) - T )) "pip install exited $RC (last lines above)"; summary; exit 1
fi
# Import the installed package from outside the source tree.
INFO=$(cd "$WORK" && "$PY" -c "
import bc_fast, bc_fast._cuda as c
i = c.device_info()
d = i['devices'][0] if i['devices'] else {}
print(f\"{bc_fast.__file__.rsplit('/', 2)[0]}; available={i['available']} {d.get('name')} cc {d.get('compute_capability')}; runtime {i['runtime_version']} cublas {i['cublas_version']}; fused sm90 kernels {i['fused_sm90_kernels']} {i['error']}\")
" 2>&1 | tail -1)
if [[ $INFO != *"available=True"* ]]; then
  echo "$INFO"
  row "build" FAIL $(( $(elapsed) - T )) "installed, but bc_fast._cuda does not see the GPU: $INFO"; summary; exit 1
fi
say "installed: $INFO"
row "build" PASS $(( $(elapsed) - T )) "BC_FAST_CUDA=ON; $INFO"
# ptxas's report on the fused sm_90a kernels (built with -Xptxas=-v): registers and spills.
PTXAS=$(grep -A3 "Compiling entry function '_ZN7cutlass13device_kernel" "$WORK/build.log" |
        grep -oE "Used [0-9]+ registers|[0-9]+ bytes spill (stores|loads)" | sort | uniq -c | tr -s ' ' | paste -sd';' -)
[[ -n $PTXAS ]] && row "sm90 kernels (ptxas)" INFO 0 "$PTXAS"

FAILED=0
# ---------------------------------------------------------------- 3. the fused kernel's variants, one process each
# A variant that has not yet run on a GPU may fault (a sticky CUDA error ends every later CUDA call of its
# process) or hang: each is checked against float64 in a process of its own under a short timeout, and only
# those found correct are timed in step 5.
VARIANTS_OK=()
if [[ $INFO == *"fused sm90 kernels True"* ]]; then
  T=$(elapsed)
  VDETAIL=()
  for v in cooperative/direct cooperative/staged pingpong/direct pingpong/staged; do
    (cd "$WORK" && timeout 90 "$PY" "$ROOT/bench/sm90_variant_check.py" "$v") >"$WORK/variant.log" 2>&1
    RC=$?
    tail -3 "$WORK/variant.log"
    if (( RC == 0 )); then
      [[ $v != cooperative/direct ]] && VARIANTS_OK+=("$v")
      VDETAIL+=("$v ok")
    elif (( RC == 2 )); then
      VDETAIL+=("$v not checked: $(tail -1 "$WORK/variant.log")")
    else
      FAILED=1
      VDETAIL+=("$v FAIL (exit $RC$( (( RC == 124 )) && echo ': hung, killed after 90 s'))")
    fi
  done
  VLINE=$(printf '%s; ' "${VDETAIL[@]}")
  VLINE=${VLINE%; }
  if [[ $VLINE == *FAIL* ]]; then
    row "sm90 variants" FAIL $(( $(elapsed) - T )) "$VLINE"
  else
    row "sm90 variants" PASS $(( $(elapsed) - T )) "$VLINE"
  fi
fi

# ---------------------------------------------------------------- 4. GPU tests
T=$(elapsed)
TESTS=()
for f in tests/test_*cuda*.py tests/test_*gpu*.py; do [[ -f $f ]] && TESTS+=("$ROOT/$f"); done
say "tests: ${TESTS[*]##*/}"
# cwd outside the tree: the tests import the installed bc_fast, not the source folder. The variant tests
# run in processes of their own, one per schedule (see step 3).
VARIANT_TESTS=test_every_sm90_variant
run_tests() {  # LOG PYTEST_ARGS...: one pytest process, its log in $WORK/LOG
  local log=$1
  shift
  (cd "$WORK" && timeout "$(( $(left) - 120 > 60 ? $(left) - 120 : 60 ))" "$PY" -m pytest -q -rs -p no:cacheprovider \
    -c "$ROOT/pyproject.toml" --rootdir "$ROOT" "$@") >"$WORK/$log" 2>&1
}
run_tests tests.log -k "not $VARIANT_TESTS" "${TESTS[@]}"
RC=$?
tail -25 "$WORK/tests.log"
for s in cooperative pingpong; do
  run_tests "tests_$s.log" -k "$VARIANT_TESTS and $s" "$ROOT/tests/test_cuda_module.py"
  R=$?
  tail -5 "$WORK/tests_$s.log"
  (( R != 0 )) && RC=$R
done
LINE=$(for l in tests.log tests_cooperative.log tests_pingpong.log; do
         grep -E "^(=+ )?[0-9]+ (passed|failed)|error" "$WORK/$l" | tail -1 | sed 's/=//g; s/^ *//'
       done | paste -sd'|' - | sed 's/|/; /g')
NOGPU=$(cat "$WORK"/tests*.log | grep -c "no CUDA GPU visible")
if (( RC == 0 && NOGPU == 0 )); then
  row "gpu tests" PASS $(( $(elapsed) - T )) "$LINE"
else
  FAILED=1
  row "gpu tests" FAIL $(( $(elapsed) - T )) "pytest exit $RC: $LINE; 'no CUDA GPU visible' skips: $NOGPU"
fi

# ---------------------------------------------------------------- 5. GPU kernels vs torch
T=$(elapsed)
say "kernels (bench/gpu_kernels.py --quick): bc_fast vs torch eager and torch.compile, per-kernel profiles"
(cd "$WORK" && timeout "$(left)" "$PY" "$ROOT/bench/gpu_kernels.py" --quick --json "$WORK/kernels.json" \
   --variants "$(IFS=,; echo "${VARIANTS_OK[*]}")") \
  2>&1 | tee "$WORK/kernels.log"
RC=${PIPESTATUS[0]}
[[ -n ${OUT:-} && -d ${OUT:-} ]] && cp "$WORK/kernels.json" "$WORK/kernels.log" "$OUT/" 2>/dev/null
sed -n '/^device copy bandwidth/,/^# [0-9]*\/[0-9]* kernel targets met/p' "$WORK/kernels.log" >"$WORK/bench.table"
MET=$(grep -E "^# [0-9]+/[0-9]+ kernel targets met" "$WORK/kernels.log" | tail -1 | sed 's/^# //')
bench_row "gpu kernels" "$RC" "$T" "$MET"

# ---------------------------------------------------------------- 6. the GPU pipeline: table conversion
T=$(elapsed)
say "pipeline (bench/bench_gpu.py --quick: table conversion on the GPU)"
(cd "$WORK" && timeout "$(left)" "$PY" "$ROOT/bench/bench_gpu.py" --quick \
   --json "$WORK/bench.json" --tmp "$WORK") 2>&1 | tee "$WORK/bench.log"
RC=${PIPESTATUS[0]}
sed -n '/^| config/,/^# [0-9]*\/[0-9]* targets met/p' "$WORK/bench.log" >"$WORK/pipeline.table"
MET=$(grep -E "^# [0-9]+/[0-9]+ targets met" "$WORK/bench.log" | tail -1 | sed 's/^# //')
bench_row "gpu pipeline" "$RC" "$T" "$MET"

summary
(( $(elapsed) > BUDGET )) && echo "gpu_check: took $(elapsed) s, over the ${BUDGET} s budget"
exit "$FAILED"
