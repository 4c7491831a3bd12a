#!/usr/bin/env bash
# The main job end to end on the embedded data: set up, write the demo images, build shards, verify
# them, then train with 2 processes under DeepSpeed ZeRO-2 with gradient accumulation, ending with sample
# and reconstruction grids. Outputs go to data/demo/ and runs/demo/ (both ignored by git).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
source=${DEMO_SOURCE:-fashion-mnist}
if [ "$source" = fashion-mnist ] && [ ! -d /usr/share/datasets/fashion-mnist ]; then
    if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
        apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 \
            || { apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null; }
    else
        echo "demo: Fashion-MNIST needs 'sudo apt-get install dataset-fashion-mnist'; using scikit-learn's digits" >&2
        source=digits
    fi
fi
images=data/demo/images-$source
shards=data/demo/shards-$source
shards demo-images "$images" --source "$source"
shards build "$images" "$shards" --labels folder --mode L --size 32
shards verify "$shards"
shards inspect "$shards" --grid "$shards-contact-sheet.png"
rm -rf runs/demo  # a fresh run each time (a run folder in use is refused)
python -m pipeline.launch --config_file launch/accelerate/cpu-2proc.yaml -m pipeline.train \
    --config launch/configs/demo.yaml data.shards="$shards" output_dir=runs/demo
echo "demo: grids in runs/demo/samples/, metrics in runs/demo/metrics.jsonl, checkpoints in runs/demo/checkpoints/ (latest: the final weights)"
