#!/usr/bin/env bash
# The GPU measurements that issues 10 and 11 still wait for, in one run sized for one device call of at most
# ten minutes (the device machine's image has torch, transformers, peft, accelerate and pytest; nothing is
# installed). Each step has its own time limit, so a slow or failing one leaves the others their time, and
# everything lands in $OUT (default benchmarks/results/gpu_checks/), six files at most:
#   device.txt                      the GPU, its driver, torch's and transformers' versions
#   gpu_checks.log                  every step's output and exit status
#   topk_bench_cuda.{json,md}       the fused top-k layer against the grouped-experts path, bf16 (issue 10.4)
#   e2e_bench_llama1b_cuda.{json,md}  a ~1.1B Llama training step and CUDA memory against PEFT LoRA (issue 10.3)
#
#   bash benchmarks/gpu_checks.sh                 # everything (about 8 minutes on an H100 is the plan)
#   STEPS="tests topk" bash benchmarks/gpu_checks.sh   # a subset
#
# Written on a machine without a GPU: the CUDA paths of these scripts have not run yet, so read the log
# before the tables.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-benchmarks/results/gpu_checks}
mkdir -p "$out"
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
steps=${STEPS:-"tests topk e2e"}
log="$out/gpu_checks.log"
: >"$log"

{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1
    "$py" -c "import torch, transformers, peft; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'| transformers', transformers.__version__, '| peft', peft.__version__)" 2>&1
} >"$out/device.txt"

run_step() {  # run_step NAME SECONDS COMMAND...: time-limited, output and exit status appended to the log
    local name=$1 limit=$2
    shift 2
    case " $steps " in *" $name "*) ;; *) return 0 ;; esac
    echo "=== $name (limit ${limit}s): $*" >>"$log"
    local start=$SECONDS
    timeout "$limit" "$@" >>"$log" 2>&1
    echo "=== $name: exit status $? after $((SECONDS - start)) s" >>"$log"
}

# the CUDA tests (fp32 and bf16 layer and mixture, merges) and the compile tests, which also run on CUDA
run_step tests 150 "$py" -m pytest -q -rs -p no:cacheprovider tests/test_cuda.py tests/test_dtypes.py tests/test_compile.py
# issue 10.4: E=8, top-2, r 4/8/16, in bf16 as a GPU trains
run_step topk 120 "$py" benchmarks/topk_bench.py --device cuda --dtype bfloat16 --rounds 5 --out "$out"
# issue 10.3: the methods the issue names, interleaved, 2 rounds of 3 timed steps; and MixLoRA with native
# weighting, whether the factored up-projection (less memory, more Python per layer) pays where launches rule
run_step e2e 270 "$py" benchmarks/e2e_bench.py --model llama1b --device cuda --rounds 2 --steps 3 \
    --variants peft_lora,lora,moelora,moa,mixlora_matched,more_matched,mixlora_matched_native --out "$out"
tail -n 3 "$log"
