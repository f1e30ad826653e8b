#!/usr/bin/env bash
# Run a short ch8fast workload under valgrind memcheck and report memory errors in the
# kernels (invalid reads/writes, uses of uninitialised values) and leaks they cause.
#
#   scripts/memcheck.sh [python]      (default: .venv/bin/python, else python3)
#   CH8FAST_MEMCHECK_ISAS="avx2 baseline"   kernel variants to check, one valgrind run each
#
# valgrind does not implement AVX-512, so the workload hides the AVX-512 kernel module
# (an import hook makes it unavailable) and selects each variant with CH8FAST_ISA.
#
# Not run in CI (it takes a minute or two). PYTHONMALLOC=malloc makes CPython use the
# system allocator, so that valgrind sees every Python allocation too. The workload steps
# every optimizer over float32 and float64 arrays (0-size, 0-d, odd sizes, and arrays large
# enough for the multi-threaded path), with 1 and 2 kernel threads, clipping and
# skip_nonfinite when available, refused bad inputs, and a checkpoint save/load.
# Exit status: 0 when no valgrind error has a ch8fast frame in its stack, 1 otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${1:-}"
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
command -v valgrind >/dev/null || { echo "valgrind is not installed"; exit 2; }
WORKLOAD="$(mktemp -t ch8fast-workload.XXXXXX.py)"
CKPT_DIR="$(mktemp -d -t ch8fast-memcheck.XXXXXX)"
trap 'rm -f "$WORKLOAD"; rm -rf "$CKPT_DIR"' EXIT

cat > "$WORKLOAD" <<'PYEOF'
import importlib.abc, os, sys

class _NoAVX512(importlib.abc.MetaPathFinder):
    """valgrind cannot execute AVX-512 instructions: make that variant unavailable."""
    def find_spec(self, name, path, target=None):
        if name.endswith("._kernels_avx512"):
            raise ImportError("hidden under valgrind (no AVX-512 emulation)")
        return None

sys.meta_path.insert(0, _NoAVX512())
import numpy as np
import ch8fast
from ch8fast import schedules as S
from ch8fast.checkpoint import save_checkpoint, load_checkpoint

try:
    ch8fast.SGD([np.zeros(1)], skip_nonfinite=True, clip_norm=1.0, clip_value=1.0)
    options = [{}, {"skip_nonfinite": True, "clip_norm": 1.0, "clip_value": 0.5}]
except TypeError:
    options = [{}]
makers = [
    lambda p, o: ch8fast.SGD(p, lr=0.1, **o),
    lambda p, o: ch8fast.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.01, **o),
    lambda p, o: ch8fast.SGD(p, lr=S.linear_decay(0.1, 10), momentum=S.momentum_ramp(),
                             nesterov=True, **o),
    lambda p, o: ch8fast.AdaGrad(p, weight_decay=0.01, initial_accumulator_value=0.1, **o),
    lambda p, o: ch8fast.RMSProp(p, **o),
    lambda p, o: ch8fast.RMSProp(p, momentum=0.9, nesterov=True, weight_decay=0.1, **o),
    lambda p, o: ch8fast.Adam(p, amsgrad=True, weight_decay=0.1, **o),
    lambda p, o: ch8fast.AdamW(p, **o),
    lambda p, o: ch8fast.AdaDelta(p, weight_decay=0.01, **o),
]
rng = np.random.default_rng(0)
shapes = [(0,), (), (1,), (7,), (3, 5), (40001,)]
for threads in (1, 2):
    ch8fast.set_num_threads(threads)
    for dtype in (np.float32, np.float64):
        for make in makers:
            for opts in options:
                params = [rng.standard_normal(s).astype(dtype) for s in shapes]
                opt = make(params, opts)
                for k in range(3):
                    grads = [rng.standard_normal(s).astype(dtype) for s in shapes]
                    if k == 1:
                        grads[3][2] = np.nan
                    with np.errstate(all="ignore"):
                        opt.step(grads)
                # non-contiguous gradient (copied), refused inputs
                g = [x.copy() for x in grads]
                g[4] = np.asfortranarray(rng.standard_normal((3, 5)).astype(dtype))
                opt.step(g)
                for bad in ([g[0]], g[:-1] + [g[-1].astype(np.int64)],
                            g[:-1] + [params[-1]]):
                    try:
                        opt.step(bad)
                    except (TypeError, ValueError):
                        pass
    path = os.path.join(sys.argv[1], "c.npz")
    save_checkpoint(path, opt, params, extra={"k": 1})
    load_checkpoint(path, opt, params)
print("workload done, kernels:", ch8fast.isa() if hasattr(ch8fast, "isa") else "?")
PYEOF

# Error contexts (valgrind's blocks, from the error line to the blank line) whose stack has
# a ch8fast frame. CPython and the dynamic loader report a few errors of their own under
# valgrind; the control run (NumPy only, no ch8fast) shows them.
ch8fast_contexts() {
    awk '/^==[0-9]+== (Invalid|Use of|Conditional|Syscall|Mismatched|Source and)/ {inb=1; hit=0}
         inb && /(ch8fast|_kernels|kernels\.pxi)/ {hit=1}
         inb && /^==[0-9]+== $/ {if (hit) n++; inb=0}
         END {print n+0}' "$1"
}
summary() {
    grep -E "ERROR SUMMARY" "$1" | sed 's/^==[0-9]*== //'
}
CONTROL_LOG="$(mktemp -t ch8fast-memcheck-control.XXXXXX.log)"
PYTHONMALLOC=malloc valgrind --tool=memcheck --leak-check=no --num-callers=30 \
    --log-file="$CONTROL_LOG" "$PY" -c "import numpy as np; a = np.ones(40001); \
    b = np.sqrt(a * a + 1.0); np.savez('$CKPT_DIR/x.npz', a=a); np.load('$CKPT_DIR/x.npz')['a']" \
    || true
echo "== control (NumPy only, no ch8fast): $(summary "$CONTROL_LOG")"

overall=0
for ISA in ${CH8FAST_MEMCHECK_ISAS:-avx2 baseline}; do
    LOG="$(mktemp -t ch8fast-memcheck-$ISA.XXXXXX.log)"
    echo "== valgrind memcheck, CH8FAST_ISA=$ISA: $PY (log: $LOG)"
    set +e
    CH8FAST_ISA=$ISA PYTHONMALLOC=malloc OMP_NUM_THREADS=2 valgrind --tool=memcheck \
        --leak-check=no --track-origins=yes --num-callers=40 \
        --log-file="$LOG" "$PY" "$WORKLOAD" "$CKPT_DIR"
    status=$?
    set -e
    echo "   $(summary "$LOG")"
    n=$(ch8fast_contexts "$LOG")
    echo "   error contexts with a ch8fast frame: $n"
    if [ "$status" -ne 0 ]; then
        echo "   memcheck ($ISA): the workload failed (exit $status); see $LOG"
        overall=1
    elif [ "$n" -ne 0 ]; then
        echo "   memcheck ($ISA): ch8fast errors; see $LOG"
        overall=1
    else
        echo "   memcheck ($ISA): no errors in ch8fast"
    fi
done
exit $overall
