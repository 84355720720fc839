#!/usr/bin/env bash
# The GPU checks of the merge engine, in one go (for a lent CUDA machine without Ray):
#   1. the method's exactness tests with the streaming kernels on CUDA (the oracle stays on CPU);
#   2. the core throughput benchmark on CUDA;
#   3. the store tests that need no Ray, whose merges pick `--device auto` = cuda.
# Wheels missing there (zarr and its needs) can be carried in .whl/ and are installed first.
# Logs and JSON go to ${OUT:-bench/out/gpu}.
#   bash bench/gpu_check.sh [core bench args...]
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-bench/out/gpu}"
mkdir -p "$out"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else '')" | tee "$out/env.log"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$out/env.log"

status=0
echo "== method tests on cuda"
MMER_TEST_DEVICE=cuda timeout 300 python3 -m pytest -q -p no:cacheprovider tests/test_method_*.py 2>&1 \
    | tee "$out/method_tests.log" || status=1
echo "== core throughput on cuda"
timeout 600 python3 bench/core_throughput.py --device cuda --cache-dir /tmp/mmer-core-cache --out "$out/core_throughput_cuda.json" "$@" 2>&1 \
    | tee "$out/core_bench.log" || status=1
echo "== store tests without Ray (merges on --device auto)"
timeout 300 python3 -m pytest -q -p no:cacheprovider tests/test_merge_methods_store.py tests/test_export_merge.py 2>&1 \
    | tee "$out/store_tests.log" || status=1
exit $status
