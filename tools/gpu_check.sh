#!/usr/bin/env bash
# The GPU check, for a lent GPU machine (H100/H200, CUDA, no network), run from anywhere:
#     OUT=/some/dir bash tools/gpu_check.sh          (carry wheels/: megatron-core's cp312 wheel)
# 1. checks that python has a CUDA torch (it cannot be installed offline: without one, stop);
# 2. installs the missing Python packages from wheels carried in wheels/ (pip --no-index);
# 3. runs the GPU tests of tests/test_attention.py;
# 4. times the attention backends (tools/gpu_bench_attention.py) and the engine
#    (tools/benchmark.py: dense vs sparse vs dta, 0.5B model, bf16, long multi-turn paths);
# 5. runs the CPU suites (tests/test_exactness.py, the rest of test_attention.py) in the time left.
# Every step has a timeout; the whole script stays under 8 minutes. Logs and JSON go to $OUT
# (at most 8 files): setup.log, test_attention.log, test_exactness.log, bench_attention_gpu.{log,json},
# benchmark.log, bench_gpu.json.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

(
  date
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  if ! timeout 60 "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())"; then
    echo "FATAL: $PY has no torch, and none can be installed without network; bring a CUDA torch image"
    exit 1
  fi
  # module -> distribution, for what the tests and benchmarks import
  missing=$(timeout 60 "$PY" - <<'EOF'
import importlib.util
need = {"megatron.core": "megatron-core", "numpy": "numpy", "safetensors": "safetensors", "yaml": "pyyaml",
        "tqdm": "tqdm", "pytest": "pytest", "pytest_timeout": "pytest-timeout", "hypothesis": "hypothesis",
        "transformers": "transformers"}
def present(mod):
    try:
        return importlib.util.find_spec(mod) is not None
    except ModuleNotFoundError:
        return False
print(" ".join(dist for mod, dist in need.items() if not present(mod)))
EOF
)
  if [ -n "$missing" ]; then
    echo "installing from wheels/: $missing"
    if [ ! -d wheels ]; then
      echo "FATAL: missing $missing and there is no wheels/ folder (fill it with pip download where there is network)"
      exit 1
    fi
    timeout 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --find-links wheels \
      --target /tmp/site $missing || { echo "FATAL: pip install from wheels/ failed"; exit 1; }
    export PYTHONPATH="$PYTHONPATH:/tmp/site"
  fi
  timeout 60 "$PY" -c "import megatron.core, megatron_dta.engine; print('megatron-core', megatron.core.__version__)"
  for pkg in transformer_engine flash_attn; do
    timeout 60 "$PY" -c "import $pkg; print('$pkg', getattr($pkg, '__version__', '?'))" 2>&1 | tail -1
  done
) > "$OUT/setup.log" 2>&1 || { cat "$OUT/setup.log"; exit 1; }
cat "$OUT/setup.log"
export PYTHONPATH="$PYTHONPATH:/tmp/site"

# GPU backend tests first (flex compiles ~30 s per dtype), then the attention timings, then the
# CPU suites (test_exactness and the CPU part of test_attention) with what time is left
timeout 170 "$PY" -m pytest -q -p no:cacheprovider -rs -k gpu_backend tests/test_attention.py > "$OUT/test_attention.log" 2>&1
echo "test_attention (GPU) exit $?"; tail -15 "$OUT/test_attention.log"

timeout 80 "$PY" tools/gpu_bench_attention.py --budget-s 45 --json "$OUT/bench_attention_gpu.json" \
  > "$OUT/bench_attention_gpu.log" 2>&1
echo "gpu_bench_attention exit $?"; grep -v "^W[0-9]" "$OUT/bench_attention_gpu.log" | tail -25

# multi-turn trajectories trained turn by turn, paths of ~16.6K tokens (4K system prompt, 8 turns)
timeout 150 "$PY" tools/benchmark.py --model 0.5b --workload multi_turn --workload-arg system_len=4096 \
  --workload-arg num_tasks=2 --workload-arg trajectories_per_task=2 --workload-arg turns=8 \
  --workload-arg turn_len=512 --workload-arg obs_len=1024 --modes dense,sparse,dta --steps 3 \
  --dtype bfloat16 --json "$OUT/bench_gpu.json" > "$OUT/benchmark.log" 2>&1
echo "benchmark exit $?"; tail -25 "$OUT/benchmark.log"

xdist=$("$PY" -c "import xdist" 2>/dev/null && echo "-n 16")
timeout "${CPU_TESTS_S:-40}" "$PY" -m pytest -q -p no:cacheprovider $xdist -k "not gpu_backend" tests/test_attention.py \
  tests/test_exactness.py > "$OUT/test_exactness.log" 2>&1
echo "CPU suites exit $? (124: out of time; they run in CI)"; tail -5 "$OUT/test_exactness.log"
