#!/usr/bin/env bash
# The torchrun path (issue 26) on a GPU machine: NCCL with world size 1, then two processes on the machine's GPUs
# (on a one-GPU machine the second run is refused: NCCL takes one GPU per rank; the script says so and goes on).
# Each run trains nnUNetTrainerMedNeXtS for EPOCHS x ITERATIONS on the tiny synthetic dataset, then nnU-Net's closing
# validation; the script prints world size, epoch times and exit codes. About 2 minutes on an H200.
#
#   scripts/torchrun_gpu_check.sh [--cpu] [WORKDIR]     (PYTHON=.venv/bin/python by default; --cpu: gloo, to try it)
set -u
device=cuda
if [ "${1:-}" = "--cpu" ]; then device=cpu; shift; fi
work=${1:-$(mktemp -d /tmp/torchrun_check.XXXXXX)}
PY=${PYTHON:-.venv/bin/python}
EPOCHS=${EPOCHS:-3}
ITERATIONS=${ITERATIONS:-10}
RUN_TIMEOUT=${RUN_TIMEOUT:-100}  # seconds per torchrun run
mkdir -p "$work"
echo "== torchrun check on $device in $work ($EPOCHS epochs x $ITERATIONS iterations, $("$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available(), torch.cuda.device_count(), "device(s)")'))"

# the tiny synthetic dataset (10 training cases), planned and preprocessed as the tests do
"$PY" - "$work" <<'EOF' || { echo "== preparing the dataset failed"; exit 1; }
import sys, time
from pathlib import Path
from nnunet_plugins import synthetic
from nnunet_plugins.workspace import nnunet_environment, run_stock
root, start = Path(sys.argv[1]), time.time()
if not (root / 'nnUNet_preprocessed' / 'Dataset991_Tiny' / 'nnUNetPlans.json').exists():
    synthetic.write_dataset(root / 'nnUNet_raw', 991, 'Tiny', 10, 3, seed=1, size=synthetic.TINY)
    run_stock(['nnUNetv2_plan_and_preprocess', '-d', 991, '-c', '3d_fullres', '-np', 2, '-npfp', 2],
              nnunet_environment(root, processes=2), capture=True)
print(f'== dataset ready in {time.time() - start:.0f} s')
EOF

export nnUNet_raw="$work/nnUNet_raw" nnUNet_preprocessed="$work/nnUNet_preprocessed"
export nnUNet_extTrainer="$("$PY" -c 'from nnunet_plugins import ext_trainer_folder; print(ext_trainer_folder())')"
export nnUNet_n_proc_DA=2 nnUNet_def_n_proc=2 nnUNet_compile=f PYTHONUNBUFFERED=1
export nnUNet_plugins_epochs=$EPOCHS nnUNet_plugins_iterations=$ITERATIONS

summary=()
for processes in 1 2; do
    export nnUNet_results="$work/results_${processes}proc"
    rm -rf "$nnUNet_results"
    output="$work/torchrun_${processes}proc.txt"
    start=$(date +%s)
    timeout "$RUN_TIMEOUT" "$PY" -m torch.distributed.run --standalone --nproc-per-node "$processes" \
        -m nnunet_plugins.train 991 3d_fullres 0 -tr nnUNetTrainerMedNeXtS -device "$device" > "$output" 2>&1
    code=$?
    seconds=$(( $(date +%s) - start ))
    log=$(ls "$nnUNet_results"/Dataset991_Tiny/*/fold_0/training_log_*.txt 2>/dev/null | head -1)
    echo "== --nproc-per-node $processes: exit code $code after ${seconds} s (timeout $RUN_TIMEOUT s: code 124)"
    if [ -n "$log" ]; then
        grep -h "torchrun: world size" "$log" | sed 's/^/   /'
        grep -h "Epoch time\|Mean Validation Dice" "$log" | sed 's/^/   /'
    fi
    if [ "$code" != 0 ]; then
        echo "   the run failed; the error, from $output:"
        grep -h "^[A-Za-z.]*Error: \|refuse\|LOCAL_RANK" "$output" | grep -v "^\s*$" | tail -4 | sed 's/^/   /'
    fi
    summary+=("--nproc-per-node $processes: exit $code, ${seconds} s")
done
echo "== summary ($device): ${summary[*]}"
