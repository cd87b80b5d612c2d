#!/usr/bin/env bash
# Install the reference implementation (nam-causal-head-gating 0.1.0, MIT) into its OWN virtual
# environment for benchmarks/compare_reference.py. It is never a dependency of chg_lens.
# torch is installed first with an exact pin so that the reference's `torch>=2.0.0` can never pull
# another torch; the other shared packages are pinned to the versions chg_lens is tested with.
#   bash benchmarks/setup_reference.sh [VENV]      (default /tmp/venv-ref)
set -euo pipefail
VENV="${1:-/tmp/venv-ref}"
TORCH="${TORCH_VERSION:-2.13.0}"
PY="${PYTHON:-python3}"
"$PY" -m venv "$VENV"
CONSTRAINTS="$(mktemp)"
cat > "$CONSTRAINTS" <<PINS
torch==$TORCH
transformers==5.23.0
tokenizers==0.23.3
safetensors==0.8.0
huggingface_hub==2.4.0
accelerate==1.15.0
gguf==0.19.0
numpy==2.4.6
pandas==3.1.1
pyarrow==26.0.1
einops==0.8.2
PyYAML==6.0.3
tqdm==4.70.1
psutil==7.2.2
PINS
# Check the reference's declared requirements first (no install): they must not need another torch.
"$VENV/bin/pip" download --no-deps --quiet -d "$(mktemp -d)" nam-causal-head-gating==0.1.0
"$VENV/bin/pip" install --quiet "torch==$TORCH" -c "$CONSTRAINTS"   # CPU users: add --index-url https://download.pytorch.org/whl/cpu
"$VENV/bin/pip" install --quiet nam-causal-head-gating==0.1.0 gguf accelerate psutil -c "$CONSTRAINTS"
"$VENV/bin/python" -c "import torch, causal_head_gating; print('reference ready:', torch.__version__)"
rm -f "$CONSTRAINTS"
