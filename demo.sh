#!/usr/bin/env bash
# The demo: the main job end to end on a fresh machine, no downloads, about 5-10 minutes on 2 CPU cores.
# Sets up .venv, generates the embedded demo dataset (10 classes of shapes, 32 px), trains a tiny SiT with
# REPA on it in pixel space, and writes sample grids (EMA model) and a loss plot to demo_out/demo/.
# Pretrained encoders cannot be downloaded here, so the demo aligns to a RANDOMLY INITIALISED DINOv2-S:
# it checks the pipeline, not the method. Extra arguments go to train.py (e.g. --max-train-steps 50).
set -euo pipefail
cd "$(dirname "$0")"
bash setup.sh
if [ ! -f data/demo/images/dataset.json ]; then
  .venv/bin/python -m preprocessing.make_demo_data --out data/demo --per-class 100
fi
.venv/bin/python train.py --config configs/demo.yaml "$@"
echo "demo: sample grids in demo_out/demo/samples/, loss curve in demo_out/demo/loss.png, stats in demo_out/demo/stats.jsonl"
