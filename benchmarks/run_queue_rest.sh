#!/usr/bin/env bash
# What the session left to run at 05:00 UTC: the interference suite's remaining rows (MOELoRA seeds 1-2,
# MixLoRA). The classification suite is not queued: its pilots kept fewer than 6 tasks (see suites_findings.md).
set -u
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 PYTHONPATH=src
PY=${PYTHON:-/work/main/.venv/bin/python}
echo "$(date -u +%H:%M:%S) rest of the queue starts (pid $$)"
$PY benchmarks/interference_bench.py run --seeds 1 2 --rows moelora_4x2
$PY benchmarks/interference_bench.py run
echo "$(date -u +%H:%M:%S) queue done"
