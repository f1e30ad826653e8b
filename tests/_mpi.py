"""Running a script under mpirun from a test, bounded in time.

``mpirun(n, script, *args, timeout=...)`` starts mpirun in a session of its own; if it has
not ended within ``timeout`` seconds the test fails (a hang), after mpirun and then every
process of its session are ended, so that no rank is left running.
"""
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MPIRUN = shutil.which("mpirun") or shutil.which("mpiexec")
HAVE_MPI4PY = importlib.util.find_spec("mpi4py") is not None

needs_mpi = pytest.mark.skipif(
    MPIRUN is None or not HAVE_MPI4PY,
    reason="needs mpirun and mpi4py (run .ci/install_mpi.sh: Open MPI + pip mpi4py); "
           f"mpirun: {MPIRUN or 'not found'}, mpi4py: "
           f"{'installed' if HAVE_MPI4PY else 'not installed'}")

_OPEN_MPI = {}


def is_open_mpi():
    if "yes" not in _OPEN_MPI:
        try:
            out = subprocess.run([MPIRUN, "--version"], capture_output=True, text=True,
                                 timeout=20)
            text = out.stdout + out.stderr
            _OPEN_MPI["yes"] = "Open MPI" in text or "OpenRTE" in text
        except (OSError, subprocess.TimeoutExpired):
            _OPEN_MPI["yes"] = False
    return _OPEN_MPI["yes"]


def _session_members(sid):
    pids = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid:          # field 6 of stat: the session id
            pids.append(int(name))
    return pids


def _end_session(proc):
    """End a timed-out mpirun (it ends its ranks on SIGTERM), then anything left of its
    session."""
    proc.terminate()
    try:
        return proc.communicate(timeout=15)
    except subprocess.TimeoutExpired:
        pass
    for pid in _session_members(proc.pid) if os.path.isdir("/proc") else [proc.pid]:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    return proc.communicate()


def mpirun(n, script, *args, timeout=90, module=False, env=None, mpi_args=()):
    """Run ``python script args`` (or ``python -m script args``) on n ranks; returns
    (CompletedProcess, the RESULT dicts printed by rank 0, elapsed seconds). Fails the
    test when mpirun has not ended within ``timeout`` seconds."""
    import time
    cmd = [MPIRUN, "-n", str(n)]
    base = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1",
                MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1",
                PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    base.update(env or {})
    env = {k: v for k, v in base.items() if v is not None}
    if is_open_mpi():
        # --oversubscribe: 3 ranks on 2 cores; as root Open MPI refuses without
        # --allow-run-as-root. Containers often forbid the cross-memory attach that
        # the shared-memory transport uses for large messages: copy through the buffer.
        cmd += ["--oversubscribe"]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            cmd += ["--allow-run-as-root"]
        env.setdefault("OMPI_MCA_btl_vader_single_copy_mechanism", "none")
        env.setdefault("OMPI_MCA_rmaps_base_oversubscribe", "1")
    cmd += list(mpi_args) + [sys.executable] + (["-m", script] if module else [script]) + list(args)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, cwd=ROOT, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        out, err = _end_session(proc)
        pytest.fail(f"mpirun -n {n} {script} {' '.join(args)} did not end within "
                    f"{timeout} s (a hang)\nstdout:\n{out[-3000:]}\nstderr:\n{err[-3000:]}")
    elapsed = time.perf_counter() - t0
    done = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
    return done, results_in(out), elapsed


def results_in(out):
    """The JSON objects printed after "RESULT " (the output of two ranks may share a line
    as mpirun forwards it)."""
    decoder, results = json.JSONDecoder(), []
    for part in out.split("RESULT ")[1:]:
        try:
            results.append(decoder.raw_decode(part)[0])
        except ValueError:
            pass
    return results


def check(proc):
    assert proc.returncode == 0, (f"mpirun exited {proc.returncode}\nstdout:\n"
                                  f"{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}")
