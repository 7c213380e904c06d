#!/usr/bin/env bash
# The GPU check: one table of the figures a GPU run of bitrain must show, with their goals.
#
#   benchmarks/gpu_check.sh                  # on a CUDA machine, full sizes (about 5-8 minutes on one H200)
#   benchmarks/gpu_check.sh --device cpu     # anywhere: tiny sizes, shows that every row runs
#   BITRAIN_CHECK_DEVICE=cpu benchmarks/gpu_check.sh
#
# Rows (full sizes):
#   1. bitrain bench: Trainer vs the hand-written loop (vs Lightning when installed), resnet18_v1
#      float at CIFAR shape (dummy 3x32x32), bf16, channels_last, batch 512     goal >= 0.98
#   2. benchmarks/bench_binary.py: binary/float training throughput of resnet18_e1, batch 1024,
#      eager                                                                    goal >= 0.95
#   3. the same, torch.compile                                                  goal >= 0.95
#   4. benchmarks/bench_loader.py: device loader vs a ResNet-18 train step      goal >= 20
#   5. tests/train/test_amp.py on the device (BITRAIN_TEST_DEVICE): AMP, GradScaler,
#      channels_last, compile, no host syncs                                    goal: all pass
# A row that fails is marked FAILED and the others still run; each row's output is kept in the
# logs folder named at the end. Nothing is installed: the tree's bitrain runs through PYTHONPATH,
# with the torch (and optional Lightning) of the Python found as $PYTHON (default: python).
# Exit code: 0 when every row ran (the goals are reported, not enforced), 1 when a row FAILED,
# 2 for bad arguments or a missing dependency.
set -euo pipefail

device=${BITRAIN_CHECK_DEVICE:-cuda}
while [[ $# -gt 0 ]]; do
  case $1 in
    --device) device=${2:-}; shift 2 || shift ;;
    --device=*) device=${1#*=}; shift ;;
    -h | --help) sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument '$1' (usage: gpu_check.sh [--device cuda|cuda:N|cpu])" >&2; exit 2 ;;
  esac
done
if [[ ! $device =~ ^(cpu|cuda(:[0-9]+)?)$ ]]; then
  echo "gpu_check.sh: --device must be cuda, cuda:N or cpu, got '$device'" >&2
  exit 2
fi

cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # this tree's bitrain, without installing it
logs=${BITRAIN_CHECK_LOGS:-$(mktemp -d -t gpu_check.XXXXXX)}
mkdir -p "$logs"
row_timeout=${BITRAIN_CHECK_ROW_TIMEOUT:-900}  # seconds per row; a hung row is FAILED, the rest go on

# --- the environment, before anything is measured -------------------------------------------
if ! "$PY" - "$device" <<'EOF'; then
import importlib.util
import platform
import sys

missing = [m for m in ("torch", "numpy", "PIL", "safetensors", "yaml", "pytest") if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"gpu_check.sh: missing Python packages: {', '.join(missing)} (nothing is installed from the internet)")
import torch

lit = importlib.util.find_spec("lightning")
lit = __import__("lightning").__version__ if lit else "not installed"
print(f"python {platform.python_version()}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"cuDNN {torch.backends.cudnn.version()}, lightning {lit}, {torch.get_num_threads()} CPU threads")
if sys.argv[1] != "cpu":
    if not torch.cuda.is_available():
        sys.exit(f"gpu_check.sh: --device {sys.argv[1]}: torch sees no CUDA device (run with --device cpu)")
    d = torch.device(sys.argv[1])
    p = torch.cuda.get_device_properties(d)
    print(f"device {d}: {p.name}, {p.total_memory / 2**30:.0f} GiB, compute capability {p.major}.{p.minor}, "
          f"{torch.cuda.device_count()} GPU(s)")
EOF
  exit 2
fi
if [[ $device != cpu ]] && command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,driver_version,memory.used,utilization.gpu --format=csv,noheader || true
fi
command -v timeout >/dev/null || timeout() { shift; "$@"; }  # no coreutils timeout: rows run unbounded

if [[ $device == cpu ]]; then  # tiny: every row runs in seconds; the figures mean nothing
  size="tiny (cpu)"
  bench=(--model tiny_resnet_e --image-size 16 --batch-size 16 --steps 2 --rounds 2 --warmup 1)
  binary=(--batch-size 2 --steps 1 --rounds 2 --warmup 1)
  compile_backend=(--backend aot_eager)  # inductor's C++ build of ResNet-18 takes minutes on a CPU
  loader=(--samples 2048 --batch-size 8 --loader-epochs 1 --steps 1 --images 32 --workers 0)
  tests=(-m "not slow")
else
  size="full"
  bench=(--model resnet18_v1 --image-size 32 --batch-size 512 --steps 50 --rounds 7 --warmup 10)
  binary=(--batch-size 1024 --steps 10 --rounds 5 --warmup 3)
  compile_backend=()
  loader=()
  tests=()
fi

names=() values=() goals=() states=() notes=()
failed=0

last_rc=0
run() {  # run NAME CMD...: CMD's output into $logs/NAME.log; its exit status, never stopping the script
  local log="$logs/$1.log" t0=$SECONDS
  shift
  echo ">> $*" >"$log"
  echo "gpu_check: $(basename "$log" .log): $*" >&2
  last_rc=0
  timeout "$row_timeout" "$@" >>"$log" 2>&1 || last_rc=$?
  echo "   exit $last_rc after $((SECONDS - t0)) s" >&2
  return "$last_rc"
}

why() {  # why NAME: the note of a FAILED row
  if [[ $last_rc == 124 ]]; then
    echo "timed out after $row_timeout s; see $logs/$1.log"
  elif [[ $last_rc != 0 ]]; then
    echo "exit $last_rc; see $logs/$1.log"
  else
    echo "no figure in its output; see $logs/$1.log"
  fi
}

grab() {  # grab LOG SED-REGEX: the first \1 of the regex in the log, or nothing
  sed -nE "s/$2/\1/p" "$logs/$1.log" | head -n 1
}

row() {  # row NAME VALUE GOAL NOTE LOG [FAILED-NOTE]: GOAL ">= X" or "all pass"; an empty VALUE is FAILED
  local state note=$4
  if [[ -z $2 ]]; then
    state=FAILED
    note="${6:+$6; }$(why "$5")"
    failed=1
  elif [[ $device == cpu ]]; then
    state="ran (cpu)"
  elif [[ $3 == ">= "* ]]; then
    state=$(awk -v v="$2" -v g="${3#>= }" 'BEGIN { print (v + 0 >= g + 0) ? "PASS" : "below goal" }')
  else
    state=PASS
  fi
  names+=("$1") values+=("${2:--}") goals+=("$3") states+=("$state") notes+=("$note")
}

# 1. Trainer vs hand-written vs Lightning
run bench "$PY" -m bitrain bench --device "$device" --dataset dummy --bits 32 --bits-a 32 \
  --dtype bfloat16 --channels-last "${bench[@]}" || true
lit=$(grab bench '^ratio lightning\/hand-written: ([0-9.]+)')
row "bench: trainer/hand-written" "$( ((last_rc)) || grab bench '^ratio trainer\/hand-written: ([0-9.]+)')" ">= 0.98" \
  "hand-written $(grab bench '^hand-written +([0-9.]+) samples.*') img/s; lightning/hand-written ${lit:-n/a}" bench

# 2-3. binary vs float training throughput, eager and compiled
for mode in eager compile; do
  extra=()
  [[ $mode == compile ]] && extra=(--compile "${compile_backend[@]}")
  run "binary_$mode" "$PY" benchmarks/bench_binary.py --device "$device" "${binary[@]}" "${extra[@]}" || true
  f=$(grab "binary_$mode" '^ *float: +([0-9.]+) samples.*')
  b=$(grab "binary_$mode" '^ *binary: +([0-9.]+) samples.*')
  row "binary/float training, $mode" "$( ((last_rc)) || grab "binary_$mode" '^ratio binary\/float: ([0-9.]+)')" \
    ">= 0.95" "binary $b, float $f img/s (resnet18_e1 32x32, batch ${binary[1]})" "binary_$mode"
done

# 4. the loader against the step it feeds
run loader "$PY" benchmarks/bench_loader.py --device "$device" "${loader[@]}" || true
row "loader/train step" "$( ((last_rc)) || grab loader '^ratio loader\/step: ([0-9.]+)')" ">= 20" \
  "device loader $(grab loader '^device loader .*: ([0-9,]+) samples\/sec') img/s" loader

# 5. the AMP / compile tests on the device
run amp_tests env BITRAIN_TEST_DEVICE="$device" "$PY" -m pytest -q -p no:cacheprovider tests/train/test_amp.py \
  "${tests[@]}" || true
summary=$(grep -E '[0-9]+ (passed|failed|error)' "$logs/amp_tests.log" | tail -n 1 | tr -d '=' || true)
summary=${summary# }
passed=$( ((last_rc)) || grep -oE '[0-9]+ passed' <<<"$summary" || true)
row "tests/train/test_amp.py on $device" "$passed" "all pass" "$summary" amp_tests "$summary"

# --- the table --------------------------------------------------------------------------------
{
  echo
  echo "gpu check on $device, $size sizes, $(date -u +%Y-%m-%dT%H:%MZ)"
  printf '%-30s  %-10s  %-9s  %-10s  %s\n' "row" "value" "goal" "status" "notes"
  printf '%-30s  %-10s  %-9s  %-10s  %s\n' "---" "-----" "----" "------" "-----"
  for i in "${!names[@]}"; do
    printf '%-30s  %-10s  %-9s  %-10s  %s\n' "${names[$i]}" "${values[$i]}" "${goals[$i]}" "${states[$i]}" "${notes[$i]}"
  done
  echo "logs: $logs"
} | tee "$logs/table.txt"
exit "$failed"
