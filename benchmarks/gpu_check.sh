#!/usr/bin/env bash
# The GPU checks of issue 7 in one go, for a machine with a CUDA GPU and PyTorch but none of
# the simulators (the planner needs none): the GPU-marked tests (fast planner == literal
# planner on the device, CUDA-graph replay == plan), then `bench planner --device cuda` at
# batch 1 and 300 (a whole MT30 evaluation at once) in fp32, bf16 and int8.
#
#   bash benchmarks/gpu_check.sh CHECKPOINT [OUTDIR]     (OUTDIR: $OUT, else ./gpu-check)
#
# Everything it prints also lands in OUTDIR (gpu_tests.log, gpu_bench.log, gpu_bench.json,
# nvidia-smi.txt); a failing step does not stop the next one, and the exit code is the
# number of failed steps. From a checkout whose checkpoints are at ../shared, on a lent
# device machine (see the device tool's README): copy the checkpoint into a folder git
# ignores, e.g. `mkdir -p .gpu && cp ../shared/checkpoints/tdmpc-opt-mt30-1M-fp16.pt .gpu/ &&
# echo /.gpu/ >> .git/info/exclude`, then run `bash benchmarks/gpu_check.sh
# .gpu/tdmpc-opt-mt30-1M-fp16.pt` there with `.gpu` carried. About 2-4 minutes on one GPU.
set -u
ckpt=${1:?usage: bash benchmarks/gpu_check.sh CHECKPOINT [OUTDIR]}
out=${2:-${OUT:-gpu-check}}
mkdir -p "$out"
here=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH="$here/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
failed=0

nvidia-smi > "$out/nvidia-smi.txt" 2>&1 || echo "nvidia-smi did not run" >> "$out/nvidia-smi.txt"
"$py" -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__,
      'cuda', torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available()
      else 'NO CUDA DEVICE')" 2>&1 | tee "$out/gpu_tests.log"

echo "== GPU tests" | tee -a "$out/gpu_tests.log"
(cd "$here" && "$py" -m pytest -q -m gpu -p no:cacheprovider tests/test_planner.py) 2>&1 \
    | tee -a "$out/gpu_tests.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || failed=$((failed + 1))

echo "== bench planner, batch 1 and 300, on the GPU" | tee "$out/gpu_bench.log"
"$py" -m tdmpc_opt bench planner --checkpoint "$ckpt" --device cuda --batch 1,300 \
    --precision fp32,bf16,int8 --seconds 5 --agreement 8 --json "$out/gpu_bench.json" 2>&1 \
    | tee -a "$out/gpu_bench.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || failed=$((failed + 1))

echo "gpu_check: $failed step(s) failed; files in $out"
exit "$failed"
