#!/usr/bin/env bash
# The peers of benchmarks/llm.py (llm-compressor, HQQ, AutoRound) in their own virtualenv, never in the
# environment postquant runs in: they pin their own transformers (llmcompressor 0.14 wants <= 5.17).
# The venv sees the system site-packages (torch, postquant's dependencies); the constraints file keeps torch
# at the version installed there, so pip does not pull another build of it.
#
#   benchmarks/setup_peers.sh [VENV]          default VENV: $POSTQUANT_PEER_VENV or /work/venv-peers
#   export POSTQUANT_PEER_PYTHON=VENV/bin/python   (llm.py's --peer-python default)
set -euo pipefail
venv="${1:-${POSTQUANT_PEER_VENV:-/work/venv-peers}}"
python="${PYTHON:-python}"
torch_version="$("$python" -c 'import torch; print(torch.__version__.split("+")[0])')"
constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
echo "torch==${torch_version}" > "$constraints"
if [[ -n "${PIP_CONSTRAINT_FILE:-}" ]]; then cat "$PIP_CONSTRAINT_FILE" >> "$constraints"; fi
[[ -x "$venv/bin/python" ]] || "$python" -m venv --system-site-packages "$venv"
"$venv/bin/pip" install -c "$constraints" llmcompressor hqq auto-round
"$venv/bin/python" -c 'import torch; assert torch.__version__.split("+")[0] == "'"$torch_version"'", torch.__version__'
"$venv/bin/python" - <<'PY'
import importlib.metadata as md
for name in ("torch", "transformers", "llmcompressor", "compressed-tensors", "hqq", "auto-round"):
    print(f"{name} {md.version(name)}")
PY
echo "peers ready: export POSTQUANT_PEER_PYTHON=$venv/bin/python"
