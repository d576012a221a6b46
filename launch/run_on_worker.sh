#!/usr/bin/env bash
# Per-worker entry point: runs on every TPU VM host of a slice (after big_vision's run_tpu.sh).
#
#   bash launch/run_on_worker.sh [--install-only] MODULE [ARGS...]
#
# 1. Finds Python >= 3.11 ($COVIPAL_PYTHON, default python3.11; installed with apt when missing:
#    the TPU runtime images are Ubuntu 22.04 with Python 3.10, and jax 0.10.2 needs 3.11).
# 2. Creates the venv $COVIPAL_VENV (default ~/covipal_venv) and installs requirements.txt +
#    jax[tpu]==$COVIPAL_JAX_VERSION, only when they changed since the last install (stamp file).
# 3. Exports COVIPAL_DISTRIBUTED=1 (the program then calls jax.distributed.initialize(); on a
#    TPU slice it discovers the coordinator and the process ids itself) and
#    `exec python -m MODULE ARGS` from the repository root, so the pid stays the python pid.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO="$(pwd)"
PY="${COVIPAL_PYTHON:-python3.11}"
VENV="${COVIPAL_VENV:-$HOME/covipal_venv}"
JAX_VERSION="${COVIPAL_JAX_VERSION:-0.10.2}"
HOST="$(hostname)"

log() { echo "[run_on_worker ${HOST}] $*" >&2; }

INSTALL_ONLY=0
if [[ "${1:-}" == "--install-only" ]]; then
  INSTALL_ONLY=1
  shift
fi
if [[ "${INSTALL_ONLY}" == 0 && $# -lt 1 ]]; then
  echo "usage: $0 [--install-only] MODULE [ARGS...]" >&2
  exit 2
fi

if ! command -v "${PY}" >/dev/null 2>&1; then
  log "${PY} not found; installing ${PY} and ${PY}-venv with apt-get"
  sudo DEBIAN_FRONTEND=noninteractive apt-get update -qq
  sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${PY}" "${PY}-venv"
fi

if [[ ! -x "${VENV}/bin/python" ]]; then
  log "creating venv ${VENV}"
  "${PY}" -m venv "${VENV}"
fi
# shellcheck disable=SC1091
source "${VENV}/bin/activate"

STAMP="${VENV}/.covipal_install_stamp"
WANT="$(cat requirements.txt pyproject.toml | sha256sum | cut -d' ' -f1) jax[tpu]==${JAX_VERSION}"
if [[ ! -f "${STAMP}" || "$(cat "${STAMP}")" != "${WANT}" ]]; then
  log "pip install -r requirements.txt jax[tpu]==${JAX_VERSION}"
  python -m pip install -q --upgrade pip
  python -m pip install -q -r requirements.txt "jax[tpu]==${JAX_VERSION}"
  echo "${WANT}" > "${STAMP}"
else
  log "requirements unchanged since the last install; skipping pip"
fi

if [[ "${INSTALL_ONLY}" == 1 ]]; then
  # Import only: initialising the TPU backend here would wait for the other hosts.
  python -c "import jax, jaxlib; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__)"
  exit 0
fi

export COVIPAL_DISTRIBUTED="${COVIPAL_DISTRIBUTED:-1}"
export PYTHONPATH="${REPO}${PYTHONPATH:+:${PYTHONPATH}}"
# Keep compiled programs across restarts (resume after preemption recompiles less).
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-$HOME/.cache/covipal_jax_xla}"
log "COVIPAL_DISTRIBUTED=${COVIPAL_DISTRIBUTED} python -m $*"
exec python -u -m "$@"
