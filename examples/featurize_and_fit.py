"""Transfer learning: Crystalformer embeddings as features for a property it was not trained on.

Featurizes structures with ``CrystalformerFeaturizer`` (the pooled embedding of a trained
model), fits a scikit-learn random forest on a target that no shipped model was trained on,
and compares with matminer's classic hand-made features (Magpie composition statistics,
density and symmetry features) under the same 5-fold cross-validation.

The default model is the featurizer's: the shipped ``multitask-backbone``. The default task
is the GLLB-SC direct band gap (eV) of the Castelli perovskites, the built-in ``perov5``
dataset of the data folder given by ``--data-dir`` or ``CRYSTALFORMER_DATA_DIR``: no model
was trained on that label (the backbone saw these structures only through their heat of
formation). Any built-in dataset and label works with ``--dataset`` and ``--target`` (e.g.
``--dataset mp20 --target magnetization_density``: no head predicts magnetism), and any
CSV/JSON table with a structure column (CIF/POSCAR text or pymatgen dicts) with ``--table``.

Usage:
    python examples/featurize_and_fit.py --data-dir /path/to/data --limit 3000
    python examples/featurize_and_fit.py --model MODEL --table my.csv --column cif --target y --log10

Which is better depends on the model and the property: measure it (docs/results.md has ours).
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.ensemble import RandomForestRegressor
from sklearn.model_selection import KFold, cross_val_predict

from ase_crystalformer.data import load_dataset
from ase_crystalformer.data.files import read_csv_frame
from ase_crystalformer.data.parse import atoms_from_pmg_dict, atoms_from_text, read_json
from ase_crystalformer.featurizer import CrystalformerFeaturizer

logger = logging.getLogger("featurize_and_fit")


def read_table(args: argparse.Namespace) -> tuple[list, np.ndarray]:
    """Structure cells (parsed later, only for the rows used) and target values of ``--table``."""
    path = Path(args.table)
    if path.suffix == ".csv":
        table = read_csv_frame(path)
    else:
        data = read_json(path)
        table = pd.DataFrame(data["data"], columns=data["columns"]) if isinstance(data, dict) else pd.DataFrame(data)
    missing = [c for c in (args.column, args.target) if c not in table.columns]
    if missing:
        raise SystemExit(f"{path}: no column {missing}; it has {list(table.columns)} (--column, --target)")
    return list(table[args.column]), table[args.target].to_numpy(float)


def read_dataset(args: argparse.Namespace) -> tuple[list, np.ndarray]:
    """Structures and labels of the built-in dataset ``--dataset`` (every split)."""
    if not (args.data_dir or os.environ.get("CRYSTALFORMER_DATA_DIR")):
        raise SystemExit(f"give --data-dir or CRYSTALFORMER_DATA_DIR (the folder holding {args.dataset}), or --table")
    dataset = load_dataset(args.dataset, [args.target], data_dir=args.data_dir)
    return [r.atoms for r in dataset.records], np.array([r.targets[args.target] for r in dataset.records], float)


def classic_features(structures: list, n_jobs: int) -> np.ndarray:
    """Magpie composition statistics + density + symmetry (matminer presets)."""
    from matminer.featurizers.base import MultipleFeaturizer
    from matminer.featurizers.composition import ElementProperty
    from matminer.featurizers.conversions import StructureToComposition
    from matminer.featurizers.structure import DensityFeatures, GlobalSymmetryFeatures

    compositions = StructureToComposition().featurize_many(structures, pbar=False)
    magpie = ElementProperty.from_preset("magpie")
    magpie.set_n_jobs(n_jobs)
    comp = np.array(magpie.featurize_many([c[0] for c in compositions], ignore_errors=True, pbar=False), float)
    structural = MultipleFeaturizer([DensityFeatures(), GlobalSymmetryFeatures(["n_symmetry_ops"])])
    structural.set_n_jobs(n_jobs)
    struct = np.array(structural.featurize_many(structures, ignore_errors=True, pbar=False), float)
    return np.hstack([comp, struct])


def cv_mae(features: np.ndarray, y: np.ndarray, seed: int) -> float:
    """5-fold cross-validated MAE of a random forest (rows with NaN features dropped).

    A third of the features per split (the usual regression forest) keeps hundreds of
    embedding columns affordable on a laptop; every feature set gets the same forest."""
    ok = np.isfinite(features).all(axis=1) & np.isfinite(y)
    model = RandomForestRegressor(n_estimators=200, max_features=1 / 3, n_jobs=-1, random_state=seed)
    pred = cross_val_predict(model, features[ok], y[ok], cv=KFold(5, shuffle=True, random_state=seed))
    return float(np.mean(np.abs(pred - y[ok])))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="trained model name or checkpoint path (default: multitask-backbone)")
    parser.add_argument("--dataset", default="perov5", help="built-in dataset in --data-dir (default: perov5)")
    parser.add_argument("--table", help="a CSV/JSON table instead of --dataset")
    parser.add_argument("--data-dir", help="data folder (or CRYSTALFORMER_DATA_DIR)")
    parser.add_argument("--column", default="structure", help="structure column of --table")
    parser.add_argument("--target", default="dir_gap", help="label or column to fit (default: dir_gap)")
    parser.add_argument("--log10", action="store_true", help="fit log10 of the (positive) target")
    parser.add_argument("--limit", type=int, default=0, help="use only N structures (a seeded random subset)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--pooling", default="mean,max,min,std",
                        help="comma-separated atom poolings; the mean-only columns are scored too")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    atoms, y = read_table(args) if args.table else read_dataset(args)
    log_target = args.log10
    keep = np.flatnonzero(np.isfinite(y) & ((y > 0) if log_target else True))
    if args.limit:
        keep = np.sort(np.random.default_rng(args.seed).permutation(keep)[: args.limit])
    atoms, y = [atoms[i] for i in keep], y[keep]
    if args.table:
        parse = lambda v: atoms_from_pmg_dict(v) if isinstance(v, dict) else atoms_from_text(v)
        atoms = [parse(v) for v in atoms]
    if log_target:
        y = np.log10(y)
    if len(y) < 10:
        raise SystemExit(f"{len(y)} structures with a usable {args.target}: 5-fold cross-validation needs at least 10")
    logger.info("%d structures, target %s%s", len(atoms), "log10 " if log_target else "", args.target)

    start = time.perf_counter()
    pooling = args.pooling.split(",")
    featurizer = CrystalformerFeaturizer(args.model, mode="embedding", device=args.device, batch_size=64, pooling=pooling)
    embedding = np.array(featurizer.featurize_many(atoms, ignore_errors=True, pbar=False), float)
    # the mean's columns are "crystalformer emb <k>"; the other statistics' carry their name
    mean_only = [k for k, name in enumerate(featurizer.feature_labels()) if name.split()[2].isdigit()]
    logger.info("Crystalformer embedding: %d features in %.1f s", embedding.shape[1], time.perf_counter() - start)

    from pymatgen.io.ase import AseAtomsAdaptor

    start = time.perf_counter()
    classic = classic_features([AseAtomsAdaptor.get_structure(a) for a in atoms], n_jobs=1)
    logger.info("matminer classic: %d features in %.1f s", classic.shape[1], time.perf_counter() - start)

    results = {
        f"Crystalformer embedding ({'+'.join(pooling)})": cv_mae(embedding, y, args.seed),
        "matminer Magpie + density + symmetry": cv_mae(classic, y, args.seed),
        "both": cv_mae(np.hstack([embedding, classic]), y, args.seed),
        **({"Crystalformer embedding (mean only)": cv_mae(embedding[:, mean_only], y, args.seed)}
           if mean_only and len(mean_only) < embedding.shape[1] else {}),
        "predict the mean": float(np.mean(np.abs(y - y.mean()))),
    }
    unit = f"log10({args.target})" if log_target else args.target
    for name, mae in results.items():
        logger.info("  5-fold MAE %-48s %.4g %s", name, mae, unit)


if __name__ == "__main__":
    main()
