#!/bin/bash
# The run that trained checkpoints/multitask-backbone (README.md there). Run from the project root.
# Its resumable state (state.pt) was not kept: this command trains a new backbone from scratch
# (about 16 h on one CPU thread); --resume continues such a new run after a stop.
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=1 CRYSTALFORMER_DATA_DIR=${CRYSTALFORMER_DATA_DIR:-../shared/data}
exec crystalformer train \
  --data mp-megnet --data mp20 --data mp-li --data mp40 --data mp2015 --data mp-elastic --data perov5 --data carbon24 \
  --target e_form@megnet=mp-megnet:e_form --target band_gap@megnet=mp-megnet:band_gap \
  --target e_form@mp20=mp20:formation_energy_per_atom \
  --target band_gap@mp=mp20:band_gap --target band_gap@mp=mp-li:band_gap --target band_gap@mp=mp40:band_gap \
  --target e_above_hull@mp=mp-li:energy_above_hull --target e_above_hull@mp=mp40:energy_above_hull \
  --target e_form@mp2015=mp2015:formation_energy_per_atom --target e_above_hull@mp2015=mp2015:e_above_hull \
  --target k_vrh=mp-elastic:k_vrh --target g_vrh=mp-elastic:g_vrh --transform k_vrh:log10 --transform g_vrh:log10 \
  --target heat_all=perov5:heat_all --target energy_per_atom@carbon24=carbon24:energy_per_atom \
  --val-fraction 0.05 --epochs 200 --swa-epochs 20 --batch-size 128 --lr 5e-4 --seed 123 \
  --cache-dir runs/cache --out runs/backbone --device cpu --no-progress "$@"
