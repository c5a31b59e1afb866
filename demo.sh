#!/usr/bin/env bash
# The demo: the main job end to end on a fresh machine, no downloads; 7 minutes on 2 CPU cores
# from a fresh clone, .venv install included.
# Sets up .venv, generates the embedded demo set (10 classes of shapes and textures, 16 px), trains a small
# SiT with REPA on it in pixel space, aligned to a ViT trained on this domain (demo/nets/), then
# samples the final EMA model and prints how many samples an independent evaluator classifies as their
# label. Outputs go to demo_out/demo/. Extra arguments go to train.py (e.g. --max-train-steps 200).
set -euo pipefail
cd "$(dirname "$0")"
bash setup.sh
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
.venv/bin/python -m demo data --out data/demo --per-class 400 --resolution 16
.venv/bin/python train.py --config configs/demo.yaml "$@"
last=$(ls demo_out/demo/checkpoints/*.pt | tail -n 1)
.venv/bin/python -m demo evaluate --ckpt "$last" --cfg-scale 4 --num-samples 500
echo "demo: samples by class in demo_out/demo/evaluation_samples.png, previews in demo_out/demo/samples/," \
  "loss curve in demo_out/demo/loss.png, stats in demo_out/demo/stats.jsonl"
