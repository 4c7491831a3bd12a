#!/usr/bin/env bash
# The main job end to end on the embedded data: set up, write the demo images, build shards, verify
# them, then train with 2 processes under DeepSpeed ZeRO-2 with gradient accumulation, ending with sample
# and reconstruction grids. Outputs go to data/demo/ and runs/demo/ (both ignored by git).
# Run again, it resumes an unfinished run (stopped by Ctrl-C, SIGTERM or a crash) from its last
# checkpoint, and starts a finished one over; its last line says which it did.
# DEMO_SOURCE (fashion-mnist | digits), DEMO_DATA (data/demo), DEMO_RUN (runs/demo) and DEMO_OVERRIDES
# (more `key=value`s for pipeline train, e.g. "max_steps=20") change what it does; DEMO_NO_SETUP=1 skips
# the set-up (the tests' own .venv).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -n "${DEMO_NO_SETUP:-}" ] || bash scripts/setup.sh
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
data=${DEMO_DATA:-data/demo}
run=${DEMO_RUN:-runs/demo}
images=$data/images-$source
shards=$data/shards-$source
shards demo-images "$images" --source "$source"
shards build "$images" "$shards" --labels folder --mode L --size 32
shards verify "$shards"
shards inspect "$shards" --grid "$shards-contact-sheet.png"
# shellcheck disable=SC2086  # DEMO_OVERRIDES holds several key=value words
overrides=(data.shards="$shards" output_dir="$run" ${DEMO_OVERRIDES:-})
demo_state() {  # "fresh", "resume STEP" (an unfinished run's last checkpoint) or "finished"
    python scripts/demo_state.py < <(python -m pipeline.train --config launch/configs/demo.yaml "${overrides[@]}" \
        --dry-run 2>/dev/null || true)
}
state=$(demo_state)
if [ "$state" = finished ]; then
    rm -rf "$run"  # a finished run starts over
    state=fresh
fi
python -m pipeline.launch --config_file launch/accelerate/cpu-2proc.yaml -m pipeline.train \
    --config launch/configs/demo.yaml "${overrides[@]}"
case $state in
    fresh) how="a new run" ;;
    *) how="resumed from its checkpoint at step ${state#resume }" ;;
esac
if [ "$(demo_state)" = finished ]; then
    echo "demo: $how, finished: grids in $run/samples/, metrics in $run/metrics.jsonl, checkpoints in $run/checkpoints/ (latest: the final weights)"
else  # stopped by SIGTERM: checkpointed and exited 0
    echo "demo: $how, stopped before its end: run bash scripts/demo.sh again to resume it from its last checkpoint"
fi
