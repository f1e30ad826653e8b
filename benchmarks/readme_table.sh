#!/bin/sh
# The commands behind the tables and figure of docs/performance.rst (about 12
# minutes on a 2-core machine). Run from the repository root, in the environment ch8fast
# is installed in. Results land in benchmarks/results/; the plot in docs/figures/bench.png.
set -e
mkdir -p benchmarks/results
# Every rule of the chapter in float32, one array of 1e2..3.2e7 elements and the
# many-tensor layouts 100x1e4 and 1000x1e3, on 1 and on 2 threads; the plot.
python -m ch8fast.apps.bench --rules sgd,momentum,nesterov,adagrad,rmsprop,adam,adamw \
    --dtype float32 --threads 1,2 \
    --json benchmarks/results/float32.json --markdown benchmarks/results/float32.md \
    --plot docs/figures/bench.png
# Adam in float64, the same sizes and layouts.
python -m ch8fast.apps.bench --rules adam --dtype float64 --threads 1,2 \
    --json benchmarks/results/float64.json --markdown benchmarks/results/float64.md
# Every rule in float64 at 16e6 elements, against the roofline only.
python -m ch8fast.apps.bench --rules sgd,momentum,nesterov,adagrad,rmsprop,adam,adamw \
    --sizes 16e6 --layouts "" --dtype float64 --threads 1,2 --no-peers --repeats 15 \
    --markdown benchmarks/results/float64_all_rules_16e6.md
