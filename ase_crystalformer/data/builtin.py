"""The named datasets of the shared data directory (layout: the data folder's README.md).

The folder is ``data_dir`` or the ``CRYSTALFORMER_DATA_DIR`` environment variable; nothing
is hard-coded. Each dataset lists the files it reads (for the cache key) and loads them into
a ``Source``; ``pipeline.assemble`` does the rest.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError
from . import jarvis
from .files import csv_entries, read_csv_frame
from .parse import atoms_from_arrays, atoms_from_cell, atoms_from_text, read_json
from .pipeline import Source
from .records import SPLIT_NAMES, Entry, as_float

ENV_VAR = "CRYSTALFORMER_DATA_DIR"

MP_CACHES = ("mp20/val", "mp20/test", "mp_li/train", "mp_li/val")
MP2015 = "mp_2015/flla_2015.csv"
LEADERBOARD = {
    "e_form": "jarvis_leaderboard/megnet_e_form.json.zip",
    "band_gap": "jarvis_leaderboard/megnet_gappbe.json.zip",
}
ELASTIC = (
    "mp_elastic/mp-binary-pbe-elasticity-2025.1.json.gz",
    "mp_elastic/brgoch_superhard_training.json.gz",
    "mp_elastic/elastic_tensor_2015.csv",
)
NPY_FILES = ("pos.npy", "cell.npy", "atomic_numbers.npy", "num_atoms.npy", "structure_id.npy")


def resolve_data_dir(data_dir: str | Path | None) -> Path:
    """``data_dir``, else ``$CRYSTALFORMER_DATA_DIR``; a ``DataError`` naming both if neither."""
    value = data_dir if data_dir is not None else os.environ.get(ENV_VAR)
    if not value:
        raise DataError(
            f"built-in datasets are read from a data directory: pass data_dir= or set the "
            f"environment variable {ENV_VAR}"
        )
    root = Path(value).expanduser()
    if not root.is_dir():
        raise DataError(f"data directory {root} (from data_dir= or ${ENV_VAR}) does not exist")
    return root


def _require(root: Path, name: str, relative: list[str]) -> list[Path]:
    missing = [r for r in relative if not (root / r).is_file()]
    if missing:
        raise DataError(f"{name}: data directory {root} (data_dir= or ${ENV_VAR}) lacks {missing}")
    return [root / r for r in relative]


# -- numpy caches (MatterGen layout) ------------------------------------------------------


def _npy_cache(folder: Path) -> tuple[list[str], Callable[[int], Any]]:
    """Ids and a builder ``make(i) -> Atoms`` for one numpy cache (fractional ``pos``)."""
    arrays = {f[:-4]: np.load(folder / f) for f in NPY_FILES}
    num = arrays["num_atoms"].astype(int)
    offsets = np.concatenate([[0], np.cumsum(num)])
    if not (
        len(arrays["cell"]) == len(num) == len(arrays["structure_id"])
        and offsets[-1] == len(arrays["pos"]) == len(arrays["atomic_numbers"])
    ):
        raise DataError(f"{folder}: numpy cache arrays have inconsistent lengths")
    pos, cell, numbers = arrays["pos"], arrays["cell"], arrays["atomic_numbers"]

    def make(i: int) -> Any:
        a, b = offsets[i], offsets[i + 1]
        return atoms_from_arrays(numbers[a:b], cell[i], fractional=pos[a:b])

    return [str(s) for s in arrays["structure_id"]], make


def _cache_labels(folder: Path, filename: str, n: int) -> list[float]:
    values = read_json(folder / filename)["values"]
    if len(values) != n:
        raise DataError(f"{folder / filename}: {len(values)} values for {n} structures")
    return [as_float(v) for v in values]


# -- mp-megnet ----------------------------------------------------------------------------


def _mp_megnet_files(root: Path) -> list[Path]:
    files = _require(root, "mp-megnet", list(LEADERBOARD.values()))
    caches = [root / c / f for c in MP_CACHES if (root / c).is_dir() for f in NPY_FILES]
    csvs = sorted((root / "mp40").glob("part*.csv")) + [p for p in [root / MP2015] if p.is_file()]
    if not caches and not csvs:
        raise DataError(
            f"mp-megnet: data directory {root} has no MP structures "
            f"({list(MP_CACHES)}, mp40/part*.csv, {MP2015})"
        )
    return files + caches + csvs


def _load_mp_megnet(root: Path) -> Source:
    """Every MP structure of the data directory whose id is in the MEGNet leaderboard split.

    Labels (``e_form`` eV/atom, ``band_gap`` eV) and the train/val/test split come from
    ``jarvis_leaderboard/megnet_{e_form,gappbe}.json.zip``. One structure per id, taken from
    the first source that has it, in this order: the numpy caches mp20/val, mp20/test,
    mp_li/train, mp_li/val (fast, no CIF parsing), then mp40/part1..6.csv (CIF), then
    mp_2015/flla_2015.csv (pymatgen dict). Records follow the leaderboard order.
    """
    labels = {t: read_json(root / f) for t, f in LEADERBOARD.items()}
    split_of = {rid: s for s in SPLIT_NAMES for rid in labels["e_form"].get(s, {})}
    found: dict[str, tuple[str, Callable[[], Any]]] = {}
    for sub in MP_CACHES:
        if (root / sub).is_dir():
            ids, make = _npy_cache(root / sub)
            for i, rid in enumerate(ids):
                if rid in split_of and rid not in found:
                    found[rid] = (sub, partial(make, i))
    csvs = [(p, "cif") for p in sorted((root / "mp40").glob("part*.csv"))]
    csvs += [(root / MP2015, "structure")] if (root / MP2015).is_file() else []
    for path, column in csvs:
        frame = read_csv_frame(path)
        for rid, text in zip(frame["material_id"].astype(str), frame[column], strict=True):
            if rid in split_of and rid not in found:
                found[rid] = (str(path.relative_to(root)), partial(atoms_from_text, text))
    entries = []
    for rid, split in split_of.items():
        if rid in found:
            targets = {t: as_float(labels[t].get(split, {}).get(rid)) for t in LEADERBOARD}
            entries.append(Entry(rid, targets, found[rid][1], split))
    origins: dict[str, int] = {}
    for origin, _ in found.values():
        origins[origin] = origins.get(origin, 0) + 1
    leaderboard_sizes = {s: len(labels["e_form"].get(s, {})) for s in SPLIT_NAMES}
    return Source(
        name="mp-megnet",
        entries=entries,
        units={"e_form": "eV/atom", "band_gap": "eV"},
        native_split="labels",
        provenance={
            "files": [str(p) for p in _mp_megnet_files(root)],
            "structure_origin": origins,
            "leaderboard_sizes": leaderboard_sizes,
            "labels": "MEGNet mp.2018.6.1 via JARVIS-Leaderboard",
        },
    )


# -- mp20, perov5, carbon24 ----------------------------------------------------------------


def _mp20_files(root: Path) -> list[Path]:
    names = [*NPY_FILES, "formation_energy_per_atom.json", "dft_band_gap.json", "dft_mag_density.json"]
    return _require(root, "mp20", [f"mp20/{s}/{f}" for s in ("val", "test") for f in names])


def _npy_parts(root: Path, folder: str, parts: Sequence[str], labels: dict[str, str]) -> list[Entry]:
    """Entries of a MatterGen numpy cache split into ``parts`` (one entry per id, the first
    part's wins); ``labels`` maps each target to its JSON file."""
    entries, seen = [], set()
    for sub in parts:
        path = root / folder / sub
        ids, make = _npy_cache(path)
        values = {t: _cache_labels(path, f, len(ids)) for t, f in labels.items()}
        for i, rid in enumerate(ids):
            if rid not in seen:
                seen.add(rid)
                entries.append(Entry(rid, {t: v[i] for t, v in values.items()}, partial(make, i)))
    return entries


def _load_mp20(root: Path) -> Source:
    """MP-20 val + test caches with their own (newer MP) labels; the train part is not available."""
    labels = {"formation_energy_per_atom": "formation_energy_per_atom.json", "band_gap": "dft_band_gap.json",
              "magnetization_density": "dft_mag_density.json"}
    return Source(
        "mp20",
        _npy_parts(root, "mp20", ("val", "test"), labels),
        {"formation_energy_per_atom": "eV/atom", "band_gap": "eV", "magnetization_density": "μB/Å³"},
        provenance={"files": [str(p) for p in _mp20_files(root)]},
    )


@dataclass(frozen=True)
class CsvSet:
    """A CDVAE-style CSV dataset: P1 CIF in ``cif``, id in ``material_id``, one file per part.

    ``labelled``: the part names are the split (perov_5); otherwise there is none (carbon_24).
    """

    name: str
    folder: str
    parts: tuple[str, ...]
    targets: tuple[str, ...]
    unit: str
    labelled: bool

    def files(self, root: Path) -> list[Path]:
        return _require(root, self.name, [f"{self.folder}/{p}.csv" for p in self.parts])

    def load(self, root: Path) -> Source:
        entries, sizes = [], {}
        for path, part in zip(self.files(root), self.parts, strict=True):
            rows, _ = csv_entries(
                read_csv_frame(path),
                path,
                structure_column="cif",
                id_column="material_id",
                target_columns=self.targets,
            )
            for entry in rows:
                entry.split = part if self.labelled else None
            entries += rows
            sizes[part] = len(rows)
        return Source(
            self.name,
            entries,
            dict.fromkeys(self.targets, self.unit),
            native_split="labels" if self.labelled else None,
            provenance={"files": [str(p) for p in self.files(root)], "rows_per_file": sizes},
        )


# -- mp-elastic ---------------------------------------------------------------------------


def _elastic_rows(root: Path) -> list[tuple[str, Any, Any, Any, Any]]:
    """(origin, id, K, G, structure) of the three files, in precedence order."""
    rows = []
    for r in read_json(root / ELASTIC[0]):
        rows.append(
            (
                ELASTIC[0],
                r.get("mp_id"),
                r.get("bulk_modulus_vrh"),
                r.get("shear_modulus_vrh"),
                r.get("structure"),
            )
        )
    table = read_json(root / ELASTIC[1])
    for values in table["data"]:
        r = dict(zip(table["columns"], values, strict=True))
        rows.append(
            (
                ELASTIC[1],
                r.get("material_id"),
                r.get("bulk_modulus"),
                r.get("shear_modulus"),
                r.get("structure"),
            )
        )
    frame = read_csv_frame(root / ELASTIC[2])
    for rid, k, g, s in zip(
        frame["material_id"], frame["K_VRH"], frame["G_VRH"], frame["structure"], strict=True
    ):
        rows.append((ELASTIC[2], rid, k, g, s))
    return rows


def _load_elastic(root: Path) -> Source:
    """MP elastic moduli (``k_vrh``, ``g_vrh``, GPa): one entry per id, sorted as strings.

    Precedence 2025 matcalc set > brgoch > 2015; rows without an id or with a non-positive
    (or missing) modulus are dropped first. The split is the paper's shuffle over the sorted
    ids (``split_ratios``, default 80/10/10, seed 123). Training applies log10 itself.
    """
    chosen: dict[str, tuple[str, float, float, Any]] = {}
    no_id = bad_modulus = overridden = 0
    for origin, rid, k, g, structure in _elastic_rows(root):
        if not isinstance(rid, str) or not rid.strip():
            no_id += 1
            continue
        k, g = as_float(k), as_float(g)
        if not (k > 0 and g > 0):  # also false for NaN
            bad_modulus += 1
        elif rid in chosen:
            overridden += 1
        else:
            chosen[rid] = (origin, k, g, structure)
    entries = [
        Entry(rid, {"k_vrh": k, "g_vrh": g}, partial(atoms_from_cell, s))
        for rid, (_, k, g, s) in sorted(chosen.items())
    ]
    origins: dict[str, int] = {}
    for origin, *_ in chosen.values():
        origins[origin] = origins.get(origin, 0) + 1
    return Source(
        "mp-elastic",
        entries,
        {"k_vrh": "GPa", "g_vrh": "GPa"},
        native_split="paper",
        provenance={
            "files": [str(root / f) for f in ELASTIC],
            "structure_origin": origins,
            "dropped_no_id": no_id,
            "dropped_nonpositive_modulus": bad_modulus,
            "duplicates_lower_precedence": overridden,
        },
    )


# -- mp-li, mp40, mp2015: MP structures with energies above hull ----------------------------


def _mp_li_files(root: Path) -> list[Path]:
    names = [*NPY_FILES, "dft_band_gap.json", "energy_above_hull.json"]
    return _require(root, "mp-li", [f"mp_li/{s}/{f}" for s in ("train", "val") for f in names])


def _load_mp_li(root: Path) -> Source:
    """MatterGen's Li-containing MP caches (train + val parts, one entry per id); no split."""
    labels = {"energy_above_hull": "energy_above_hull.json", "band_gap": "dft_band_gap.json"}
    return Source(
        "mp-li", _npy_parts(root, "mp_li", ("train", "val"), labels),
        {"energy_above_hull": "eV/atom", "band_gap": "eV"},
        provenance={"files": [str(p) for p in _mp_li_files(root)]},
    )


@dataclass(frozen=True)
class MpCsv:
    """MP structures in CSV files with a ``material_id`` column; the first row of an id wins."""

    name: str
    paths: Callable[[Path], list[Path]]
    structure_column: str
    units: dict[str, str]

    def files(self, root: Path) -> list[Path]:
        found = self.paths(root)
        if not found:
            raise DataError(f"{self.name}: data directory {root} (data_dir= or ${ENV_VAR}) lacks its files")
        return found

    def load(self, root: Path) -> Source:
        entries, seen, duplicates = [], set(), 0
        for path in self.files(root):
            rows, _ = csv_entries(read_csv_frame(path), path, structure_column=self.structure_column,
                                  id_column="material_id", target_columns=tuple(self.units))
            for entry in rows:
                if entry.id in seen:
                    duplicates += 1
                    continue
                seen.add(entry.id)
                entries.append(entry)
        return Source(self.name, entries, dict(self.units), provenance={
            "files": [str(p) for p in self.files(root)], "duplicate_ids_dropped": duplicates})


MP40 = MpCsv("mp40", lambda root: sorted((root / "mp40").glob("part*.csv")), "cif",
             {"energy_above_hull": "eV/atom", "band_gap": "eV"})
MP2015_SET = MpCsv("mp2015", lambda root: [p for p in [root / MP2015] if p.is_file()], "structure",
                   {"formation_energy_per_atom": "eV/atom", "e_above_hull": "eV/atom"})


# -- registry -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Builtin:
    """A named dataset: the files it reads (for the cache key) and its loader."""

    files: Callable[[Path], list[Path]]
    load: Callable[[Path], Source]


def _jarvis_builtin(kind: str) -> Builtin:
    return Builtin(
        lambda root: [jarvis.find_file(root, kind)],
        lambda root: jarvis.load_jarvis(jarvis.find_file(root, kind), kind=kind),
    )


PEROV5 = CsvSet(
    "perov5",
    "perov_5",
    ("train", "val", "test"),
    ("heat_all", "heat_ref", "dir_gap", "ind_gap"),
    "eV",
    labelled=True,
)
CARBON24 = CsvSet(
    "carbon24", "carbon_24", ("val", "test"), ("energy_per_atom",), "eV/atom", labelled=False
)

BUILTINS: dict[str, Builtin] = {
    "mp-megnet": Builtin(_mp_megnet_files, _load_mp_megnet),
    "mp20": Builtin(_mp20_files, _load_mp20),
    "mp-elastic": Builtin(lambda root: _require(root, "mp-elastic", list(ELASTIC)), _load_elastic),
    "perov5": Builtin(PEROV5.files, PEROV5.load),
    "carbon24": Builtin(CARBON24.files, CARBON24.load),
    "mp-li": Builtin(_mp_li_files, _load_mp_li),
    "mp40": Builtin(MP40.files, MP40.load),
    "mp2015": Builtin(MP2015_SET.files, MP2015_SET.load),
    "megnet": _jarvis_builtin("megnet"),
    "dft_3d_2021": _jarvis_builtin("dft_3d_2021"),
}
