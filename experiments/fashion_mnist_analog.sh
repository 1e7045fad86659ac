#!/usr/bin/env bash
# The Fashion-MNIST analog of paper tables 1-4 (docs/results.md): teacher, layer
# profiling, then local (60k / 30k / 10k) and global at CR 0.5 (local and global with
# seeds 0, 1, 2: mean +- std in the tables), local, global and hybrid at CR 0.7, local
# with the data-aware init (ALS + compensation) at CR 0.5 and 0.7, then the tables and
# figures. Needs the Debian package dataset-fashion-mnist (or data.root /
# data.download=true). About 3 h on 2 CPU cores.
# Usage: bash experiments/fashion_mnist_analog.sh [extra overrides...]
# Runs go to $TNEXP_RUNS_DIR (default: runs/); a rerun resumes unfinished runs and
# skips finished ones.
set -euo pipefail
runs=${TNEXP_RUNS_DIR:-runs}
exp=analog/fashion_mnist
seeded=" local_cr0.5 global_cr0.5 "  # Hydra multirun over seed=0,1,2 (run folders <run>/0..2)
for name in teacher profile local_cr0.5 global_cr0.5 local_cr0.5_als local_cr0.7 global_cr0.7 \
            hybrid_cr0.7 local_cr0.7_als local_cr0.5_30k local_cr0.5_10k; do
  run_name=$(grep -m1 '^run_name:' "configs/experiment/$exp/$name.yaml" | awk '{print $2}')
  multirun=()
  done_file="$runs/fashion_mnist_resnet18/$run_name/results.json"
  if [[ $seeded == *" $name "* ]]; then
    multirun=(-m seed=0,1,2)
    done_file="$runs/fashion_mnist_resnet18/$run_name/2/results.json"
  fi
  if [[ -f $done_file ]]; then
    echo "== $name: done, skipping"; continue
  fi
  echo "== $name"
  extra=(resume=auto)
  [[ $name == profile ]] && extra=()
  uv run tnexp "${multirun[@]}" "experiment=$exp/$name" "${extra[@]}" "$@"
done
uv run tnexp-aggregate "$runs/fashion_mnist_resnet18" --out docs/results/fashion_mnist
