#!/usr/bin/env bash
# Everything a short GPU lease should run, in priority order, each part under its own time limit and all of
# them under BUDGET_S, so that one hang cannot eat the rest and the script ends before the call's limit:
# the CUDA tests, the kernel timings, the ring attention's block, MFU of the 1B shape (eager at micro batch 1, 4, 8; compiled, checkpointing all blocks and every second) and a
# profile of its step, then the kernel and attention tests on the GPU. Name parts to run only those. Results files are
# packed into $OUT/results.tar after every part (a lease returns few files; unpack into benchmarks/results/),
# the whole log goes to $OUT/all.log.
#
#   BLTDIST_COMMIT=$(git rev-parse HEAD) OUT=/tmp/gpu BUDGET_S=520 bash benchmarks/gpu_checks.sh [PART...]
set -u
OUT=${OUT:-/tmp/bltdist-gpu}
BUDGET_S=${BUDGET_S:-100000}
RESULTS=$(mktemp -d /tmp/bltdist-results.XXXX)
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
exec > >(tee -a "$OUT/all.log") 2>&1
wanted=" ${*:-test_cuda kernels ring_block mfu mfu_micro4 mfu_micro8 mfu_compile mfu_ac_every_second profile profile_compile kernel_and_attention_tests} "

part() {  # part SECONDS NAME COMMAND...: run if wanted, within its limit and what is left of the budget
    local limit=$1 name=$2 start=$SECONDS
    shift 2
    [[ $wanted == *" $name "* ]] || return 0
    (( limit > BUDGET_S - SECONDS )) && limit=$(( BUDGET_S - SECONDS ))
    if (( limit < 20 )); then echo "=== $name: skipped, ${limit}s of the budget left"; return 0; fi
    echo "=== $name (limit ${limit}s)"
    timeout --kill-after=10 "$limit" "$@"
    echo "=== $name: exit $? after $((SECONDS - start))s"
    tar -C "$RESULTS" -cf "$OUT/results.tar" .
}

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name(0))"
# The image has no network, and pip's editable install of setup.py wants to fetch setuptools: put the
# tree on the path instead (kernels/ is bltdist.kernels, as setup.py maps it).
if ! python3 -c "import bltdist.kernels" 2>/dev/null; then
    ln -sfn "$PWD/kernels" src/bltdist/kernels
    export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
fi

part 210 test_cuda python3 -m pytest -v -rA -p no:cacheprovider tests/test_cuda.py
part 90 kernels python3 benchmarks/kernels.py --seq-lens 8192 16384 --iters 10 --warmup 3 --out-dir "$RESULTS"
# Context parallelism's ring block at BLT-1B's global shape (micro batch 8, 8192 bytes): TF32 against fp32 products and SDPA.
part 60 ring_block python3 benchmarks/ring_block.py --results-dir "$RESULTS"
# BLT-1B's fp32 weights, gradients and AdamW state alone are 66 GB on one unsharded GPU (122 GB peak
# on an H200): on a card under 100 GB the hash tables shrink to 100002 rows each. Lookups are no
# FLOPs, so MFU keeps its meaning; the change is in the results' config.
small_card=$(python3 -c "import torch; print(int(torch.cuda.get_device_properties(0).total_memory < 100e9))")
fit=()
[ "$small_card" = 1 ] && fit=(--model.blt.hash_vocab=100002) && echo "card under 100 GB: ${fit[*]}"
# One GPU: global batch 8 of 8192 bytes instead of the config's 256. 10 steps: the first intervals hold
# the warm-up's compilations (patch-count buckets), the median should not.
mfu_sweep=(--configs configs/blt_1b.yaml --seq-lens 8192 --layouts fsdp --steps 10
           --results-dir "$RESULTS" --overrides --train.global_batch_size=8 "${fit[@]}")
part 170 mfu python3 benchmarks/mfu.py --name mfu "${mfu_sweep[@]}" --train.micro_batch_size=1
# The H100 profile found the step host-bound (GPU idle 59% of it, 9358 launches): fewer, larger launches.
part 150 mfu_micro4 python3 benchmarks/mfu.py --name mfu_micro4 "${mfu_sweep[@]}" --train.micro_batch_size=4
part 150 mfu_micro8 python3 benchmarks/mfu.py --name mfu_micro8 "${mfu_sweep[@]}" --train.micro_batch_size=8
part 220 mfu_compile python3 benchmarks/mfu.py --name mfu_compile "${mfu_sweep[@]}" --train.micro_batch_size=8 \
    --train.compile=true
# Half the blocks keep their activations: half the recompute, the largest lever the compiled profile showed
# (H100, 2026-11-27: 31.5% MFU against 28.5%, 67.3 GB against 42.4).
part 220 mfu_ac_every_second python3 benchmarks/mfu.py --name mfu_ac_every_second "${mfu_sweep[@]}" \
    --train.micro_batch_size=8 --train.compile=true --train.activation_checkpointing_interval=2
# One profiled step at micro batch 8 (no longer host-bound there): where the GPU time goes.
part 120 profile python3 -m torch.distributed.run --standalone --nproc_per_node=1 -m bltdist.train \
    configs/blt_1b.yaml --train.steps=4 --train.global_batch_size=8 --train.micro_batch_size=8 \
    --logging.interval=1 --train.val_interval=0 --train.val_batches=1 --checkpoint.interval=0 \
    --checkpoint.final=false --output_dir=/tmp/bltdist-profile --logging.profile_steps=[3] "${fit[@]}"
part 60 profile python3 benchmarks/trace_summary.py \
    /tmp/bltdist-profile/profile/rank0_step3.json --top 30 --results-dir "$RESULTS"
# The same step compiled, past its warm-up: where compile changes the GPU time.
part 240 profile_compile python3 -m torch.distributed.run --standalone --nproc_per_node=1 -m bltdist.train \
    configs/blt_1b.yaml --train.steps=6 --train.global_batch_size=8 --train.micro_batch_size=8 --train.compile=true \
    --logging.interval=1 --train.val_interval=0 --train.val_batches=1 --checkpoint.interval=0 \
    --checkpoint.final=false --output_dir=/tmp/bltdist-profile-compile --logging.profile_steps=[5] "${fit[@]}"
part 60 profile_compile python3 benchmarks/trace_summary.py --name profile_compile \
    /tmp/bltdist-profile-compile/profile/rank0_step5.json --top 30 --results-dir "$RESULTS"
part 150 kernel_and_attention_tests python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py \
    tests/test_attention.py
