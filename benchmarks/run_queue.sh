#!/usr/bin/env bash
# The CPU benchmark queue: one process at a time, one torch thread, most informative runs first.
# Every run writes its JSON when it ends and finished runs are skipped, so the queue can be stopped and
# started again. Tables from whatever finished:
#   python benchmarks/interference_bench.py assemble && python benchmarks/mtl_bench.py assemble
set -u
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 PYTHONPATH=src
PY=${PYTHON:-/work/main/.venv/bin/python}
echo "$(date -u +%H:%M:%S) queue starts (pid $$)"
# 1. interference suite, seed 0 (the demo's evidence): shared LoRA against task-routed methods
$PY benchmarks/interference_bench.py run --seeds 0 \
  --rows lora_r8 per_task_lora_r4 more_r8 more_r8_no_linear_scaling moelora_4x2
# 2. classification suite: pilot (chooses the tasks), then the queue (MoRE question first)
[ -f benchmarks/results/mtl_cpu/suite.json ] || $PY benchmarks/mtl_bench.py pilot
$PY benchmarks/mtl_bench.py queue --rows lora more_linear_scaling more_no_linear_scaling moelora_4x2
# 3. interference seeds 1 and 2, then the rest of both suites
$PY benchmarks/interference_bench.py run --seeds 1 2 \
  --rows lora_r8 per_task_lora_r4 more_r8 more_r8_no_linear_scaling moelora_4x2
$PY benchmarks/mtl_bench.py queue
$PY benchmarks/interference_bench.py run
echo "$(date -u +%H:%M:%S) queue done"
