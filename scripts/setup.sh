#!/usr/bin/env bash
# Set up fundiff in ./.venv: idempotent, safe to run before every command.
#
# torch: an existing torch in .venv is kept (GPU users: install the CUDA build you want
# into .venv first). When torch is missing, the CPU build torch==2.13.0 is installed, so pip
# never pulls a multi-gigabyte CUDA build just to satisfy the dependency.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  .venv/bin/python -m pip install --quiet "torch==2.13.0"
fi
# The editable install registers fundiff's entry points (every built-in plugin is one).
# Extras: test (pytest, hypothesis), digits (scikit-learn's bundled digits), docs (mkdocs),
# diffusers (only for the parity tests against diffusers' schedulers; never imported at run time).
# (this machine's pip config warns about absent local index folders; those lines are dropped)
set +e
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[test,digits,docs,diffusers]" 2>&1 \
  | grep -v "is neither a file nor a directory"
status=${PIPESTATUS[0]}
set -e
if [ "$status" -ne 0 ]; then
  echo "setup: pip install failed (exit $status)" >&2
  exit "$status"
fi
# k-diffusion, only for the parity tests: its wheel is pure Python and the tests load its
# sampling module alone, so it goes in without its (training and evaluation) dependencies.
.venv/bin/python -m pip show k-diffusion >/dev/null 2>&1 \
  || .venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps "k-diffusion==0.1.1.post1" 2>&1 \
  | grep -v "is neither a file nor a directory" || true
.venv/bin/python -c "import fundiff, torch; print(f'fundiff {fundiff.__version__} ready (torch {torch.__version__})')"
