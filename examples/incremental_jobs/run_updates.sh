#!/usr/bin/env bash
# Three incremental updates, each one process that runs one `fit` and exits, as a scheduler would run them.
# Update 0 starts from scratch; update k > 0 starts from the checkpoint update k - 1 left in <checkpoint dir>.
#
#   ./run_updates.sh [checkpoint dir]   (default: checkpoints; logs go to ./logs)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
checkpoints="${1:-checkpoints}"
python="${PYTHON:-python}"

if [[ -e "$checkpoints/last.ckpt" ]]; then
    echo "$checkpoints/last.ckpt exists already: update 0 would not start from scratch." >&2
    echo "Remove it, or pass another checkpoint directory: $0 <checkpoint dir>" >&2
    exit 1
fi

for task in 0 1 2; do
    resume=()
    if ((task > 0)); then
        resume=(--ckpt_path "$checkpoints/last.ckpt")
    fi
    echo "=== update $task ==="
    # TaskCheckpoint is the last callback of config.yaml: --trainer.callbacks.dirpath sets its dirpath.
    "$python" "$here/main.py" fit --config "$here/config.yaml" --data.task "$task" \
        --trainer.callbacks.dirpath "$checkpoints" ${resume[@]+"${resume[@]}"}
done

"$python" - "$checkpoints/last.ckpt" <<'PY'
import sys

import torch

evaluation = torch.load(sys.argv[1], weights_only=False)["callbacks"]["ContinualEvaluation"]
print("accuracy after each update (columns: task 0, 1, ...):")
for row in evaluation["matrices"]["acc"]:
    print("  " + "  ".join(f"{value:.3f}" for value in row))
PY
