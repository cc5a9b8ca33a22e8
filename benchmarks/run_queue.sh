#!/usr/bin/env bash
# The CPU benchmark queue: one process at a time, one torch thread, most informative runs first.
# Every run writes its JSON when it ends and finished runs are skipped, so the queue can be stopped and
# started again (WAIT_PID: start only once that process has ended). Tables from whatever finished:
#   PYTHONPATH=src python benchmarks/interference_bench.py assemble
#   PYTHONPATH=src python benchmarks/mtl_bench.py assemble
set -u
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 PYTHONPATH=src
PY=${PYTHON:-/work/main/.venv/bin/python}
if [ -n "${WAIT_PID:-}" ]; then while kill -0 "$WAIT_PID" 2>/dev/null; do sleep 10; done; fi
echo "$(date -u +%H:%M:%S) queue starts (pid $$)"
MAIN_ROWS="lora_r8 per_task_lora_r4 more_r8 more_r8_no_linear_scaling"
# 1. interference suite (the demo's evidence and the MoRE scaling question), three seeds of the main rows
$PY benchmarks/interference_bench.py run --seeds 0 --rows $MAIN_ROWS moelora_4x2
$PY benchmarks/interference_bench.py run --seeds 1 2 --rows $MAIN_ROWS
# 2. classification suite: pilot (chooses the tasks), then the MoRE question's rows, lr sweeps interleaved
[ -f benchmarks/results/mtl_cpu/suite.json ] || $PY benchmarks/mtl_bench.py pilot
$PY benchmarks/mtl_bench.py assemble > /dev/null
$PY benchmarks/mtl_bench.py queue --rows lora more_linear_scaling more_no_linear_scaling moelora_4x2
# 3. the rest of both suites
$PY benchmarks/interference_bench.py run --seeds 1 2 --rows moelora_4x2
$PY benchmarks/interference_bench.py run
$PY benchmarks/mtl_bench.py queue
echo "$(date -u +%H:%M:%S) queue done"
