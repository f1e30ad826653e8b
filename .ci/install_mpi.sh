#!/usr/bin/env bash
# Install Open MPI (system packages) and mpi4py (into the active Python environment), for
# tests/test_distributed.py and ch8fast.distributed. Idempotent and quiet: does nothing
# that is already done. Run it with the project's virtual environment active (or set
# PYTHON=/path/to/python). Without root or apt-get, it says what is missing and exits 0:
# the MPI tests are then skipped, with the reason.
set -euo pipefail

PYTHON="${PYTHON:-python}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3

if ! command -v mpirun >/dev/null 2>&1 || ! command -v mpicc >/dev/null 2>&1; then
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then
        if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
            SUDO="sudo -n"
        else
            echo "install_mpi.sh: Open MPI is missing and this user cannot install system" \
                 "packages; the MPI tests will be skipped" >&2
            exit 0
        fi
    fi
    if command -v apt-get >/dev/null 2>&1; then
        export DEBIAN_FRONTEND=noninteractive
        if ! { $SUDO apt-get update -qq >/dev/null &&
               $SUDO apt-get install -y -qq --no-install-recommends openmpi-bin \
                   libopenmpi-dev >/dev/null; }; then
            echo "install_mpi.sh: apt-get could not install Open MPI; the MPI tests will" \
                 "be skipped" >&2
            exit 0
        fi
    else
        echo "install_mpi.sh: no apt-get; install Open MPI (mpirun, mpicc) by hand" >&2
        exit 0
    fi
fi

if ! "$PYTHON" -c "import mpi4py" >/dev/null 2>&1; then
    # PyPI's mpi4py wheel loads the system's libmpi at run time; if no wheel fits this
    # platform pip builds it from source with mpicc (libopenmpi-dev).
    if ! "$PYTHON" -m pip install --quiet --disable-pip-version-check "mpi4py>=3.1"; then
        echo "install_mpi.sh: pip could not install mpi4py; the MPI tests will be" \
             "skipped" >&2
        exit 0
    fi
fi

# A one-line check that the two work together (as root Open MPI needs the flag).
ROOT_FLAG=""
[ "$(id -u)" -eq 0 ] && ROOT_FLAG="--allow-run-as-root"
mpirun $ROOT_FLAG --oversubscribe -n 2 "$PYTHON" -c \
    "from mpi4py import MPI; c = MPI.COMM_WORLD; assert c.allreduce(1) == c.Get_size() == 2" \
    || { echo "install_mpi.sh: mpirun -n 2 with mpi4py failed" >&2; exit 1; }
