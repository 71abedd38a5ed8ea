#!/usr/bin/env bash
# One prepared device check (bench/gpu_check.py): writes bench/results/gpu.json and prints a table.
#   bash bench/gpu_check.sh            # on a CUDA machine, under 8 minutes
#   bash bench/gpu_check.sh --dry-run  # the CPU rehearsal that `make test` runs
# It installs nothing from the network (the device machine has none): it uses the repo's .venv where
# `make install` made one, else $RCMED_PYTHON, else python3; wheels left in .whl/ (the device README's way to
# carry a package: transformers==5.24.0, which the code pins, and segment-anything==1.0, both missing or
# other there; SimpleITK is not needed, gpu_check.py stands in for it) are installed offline into /tmp first.
# Fetch them once, where PyPI answers (13.6 MB; carry .whl with the run):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux2014_x86_64 -d .whl transformers==5.24.0 segment-anything==1.0
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${RCMED_PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/rcmed-site .whl/*.whl
  export PYTHONPATH="/tmp/rcmed-site${PYTHONPATH:+:$PYTHONPATH}"
fi
# The repo itself on the path: the device gets a copy of the tree, not an installed package, and
# training/ is imported as rcmed_training (pyproject's package-dir): alias this tree's, ahead of any install.
alias_dir="$(mktemp -d)"
ln -s "$PWD/training" "$alias_dir/rcmed_training"
export PYTHONPATH="$alias_dir:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# The parts keep their own budgets; this is the backstop that keeps the whole under 8 minutes.
exec timeout 470 "$PY" bench/gpu_check.py "$@"
