"""The data-reading layer: splits, jarvis-tools files, built-in datasets, user files, cache.

Built-in loaders read the trimmed copies of the shared data directory in
``tests/fixtures/data`` (see its README); user-format files are written here from ASE
structures and read back.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import logging
import random
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from ase import Atoms
from ase.build import bulk
from ase.calculators.singlepoint import SinglePointCalculator

import ase_crystalformer.data as data_pkg
from ase_crystalformer.data import Dataset, Record, load_dataset, paper_split, ratio_split
from ase_crystalformer.data.cif import read_p1_cif
from ase_crystalformer.data.parse import atoms_from_structure, atoms_from_text
from ase_crystalformer.errors import DataError

FIXTURES = Path(__file__).parent / "fixtures" / "data"


# -- helpers ------------------------------------------------------------------------------


def crystals() -> list[Atoms]:
    """Three small crystals with non-special positions (rattled) and different cells."""
    nacl = bulk("NaCl", "rocksalt", a=5.64, cubic=True)
    si = bulk("Si", "diamond", a=5.43)
    tio2 = Atoms(
        "Ti2O4",
        cell=[4.59, 4.59, 2.96],
        pbc=True,
        scaled_positions=[
            [0, 0, 0],
            [0.5, 0.5, 0.5],
            [0.305, 0.305, 0],
            [0.695, 0.695, 0],
            [0.805, 0.195, 0.5],
            [0.195, 0.805, 0.5],
        ],
    )
    for i, atoms in enumerate((nacl, si, tio2)):
        atoms.rattle(0.05, seed=i)
        atoms.wrap()
    return [nacl, si, tio2]


def assert_same_crystal(a: Atoms, b: Atoms, atol: float = 1e-5) -> None:
    """Same species, cell shape and fractional positions (mod 1), in the same order."""
    assert a.numbers.tolist() == b.numbers.tolist()
    np.testing.assert_allclose(a.cell.cellpar(), b.cell.cellpar(), atol=atol)
    d = a.cell.scaled_positions(a.positions) - b.cell.scaled_positions(b.positions)
    np.testing.assert_allclose(d - np.round(d), 0, atol=atol)


def ids_by_split(ds: Dataset) -> dict[str, list[str]]:
    return {k: [ds.records[i].id for i in v] for k, v in ds.splits.items()}


def read_zip_json(path: Path) -> dict:
    with zipfile.ZipFile(path) as z:
        return json.loads(z.read(z.namelist()[0]))


def cache_atoms(folder: Path, rid: str) -> Atoms:
    """A structure straight from a numpy cache (fractional positions)."""
    ids = [str(s) for s in np.load(folder / "structure_id.npy")]
    i = ids.index(rid)
    num = np.load(folder / "num_atoms.npy")
    a, b = num[:i].sum(), num[: i + 1].sum()
    cell = np.load(folder / "cell.npy")[i]
    return Atoms(
        numbers=np.load(folder / "atomic_numbers.npy")[a:b],
        cell=cell,
        pbc=True,
        scaled_positions=np.load(folder / "pos.npy")[a:b],
    )


# -- splits -------------------------------------------------------------------------------


def test_paper_split_reproduces_the_megnet_split():
    state = random.getstate()
    s = paper_split(69239, 60000, 5000, 4239)
    assert random.getstate() == state  # the global RNG is not touched
    assert [len(s[k]) for k in ("train", "val", "test")] == [60000, 5000, 4239]
    assert s["train"][:4] == [27831, 58056, 60863, 55915]
    assert s["train"][-2:] == [63298, 67403]
    assert s["val"][:4] == [24566, 16870, 42123, 68097]
    assert s["test"][:4] == [22274, 31381, 19400, 58740]
    assert s["test"][-2:] == [35084, 6863]
    assert len(set(s["train"]) | set(s["val"]) | set(s["test"])) == 69239


def test_paper_split_ratio_counts_leave_one_unused_for_dft_3d():
    s = paper_split(55723, 44578, 5572, 5572)
    used = set(s["train"]) | set(s["val"]) | set(s["test"])
    assert len(used) == 55722
    ids = list(range(55723))
    random.Random(123).shuffle(ids)
    assert set(range(55723)) - used == {ids[44578]}  # the one between train and val
    assert paper_split(10, 8, 2, 0)["test"] == []
    with pytest.raises(DataError, match="do not fit"):
        paper_split(10, 8, 2, 1)


def test_ratio_split_uses_every_index_and_depends_on_seed():
    s = ratio_split(11, (0.8, 0.1, 0.1), seed=5)
    assert [len(s[k]) for k in ("train", "val", "test")] == [9, 1, 1]
    assert sorted(s["train"] + s["val"] + s["test"]) == list(range(11))
    assert ratio_split(11, seed=5) == s
    assert ratio_split(100, seed=1)["train"] != ratio_split(100, seed=2)["train"]
    with pytest.raises(DataError, match="split_ratios"):
        ratio_split(10, (0.9, 0.2, 0.1))


# -- jarvis-tools JSON --------------------------------------------------------------------


def jarvis_rows(n: int = 20) -> list[dict]:
    """jarvis-tools style entries; every 4th formation energy and every 5th gap is 'na'."""
    rows = []
    for i in range(n):
        atoms = bulk("Cu", "fcc", a=3.5 + 0.02 * i) if i % 2 else crystals()[1]
        cartesian = i % 3 == 0
        coords = atoms.positions if cartesian else atoms.get_scaled_positions()
        rows.append(
            {
                "jid": f"JVASP-{100 + i}",
                "atoms": {
                    "lattice_mat": atoms.cell.array.tolist(),
                    "coords": coords.tolist(),
                    "elements": atoms.get_chemical_symbols(),
                    "cartesian": cartesian,
                },
                "formation_energy_peratom": "na" if i % 4 == 0 else -0.1 * i,
                "optb88vdw_bandgap": "na" if i % 5 == 0 else 0.05 * i,
                "mbj_bandgap": 1.0 if i < 3 else "na",
                "spg_symbol": "Fm-3m",
            }
        )
    return rows


def test_jarvis_file_filters_before_the_paper_split(tmp_path):
    rows = jarvis_rows()
    path = tmp_path / "dft_3d_2021-mini.json"
    path.write_text(json.dumps(rows))
    targets = ["formation_energy_peratom", "optb88vdw_bandgap"]
    ds = load_dataset(path, targets)
    kept = [r for i, r in enumerate(rows) if i % 4 and i % 5]
    assert len(ds) == len(kept) == 12
    assert ds.provenance["n_dropped_nonfinite"] == 8
    assert ds.units == {"formation_energy_peratom": "eV/atom", "optb88vdw_bandgap": "eV"}
    # Filter first, then shuffle the filtered list: ALIGNN's int(ratio * total) counts.
    expected = paper_split(12, 9, 1, 1)
    assert ids_by_split(ds) == {k: [kept[i]["jid"] for i in v] for k, v in expected.items()}
    by_id = {r.id: r for r in ds.records}
    for row in kept:
        rec = by_id[row["jid"]]
        assert rec.targets == {t: pytest.approx(row[t]) for t in targets}
        a = row["atoms"]
        ref = Atoms(
            a["elements"],
            cell=a["lattice_mat"],
            pbc=True,
            **({"positions": a["coords"]} if a["cartesian"] else {"scaled_positions": a["coords"]}),
        )
        np.testing.assert_allclose(rec.atoms.positions, ref.positions, atol=1e-12)
        np.testing.assert_allclose(rec.atoms.cell.array, ref.cell.array)
    # A sparse target is filtered on its own; all targets: entries with at least one value.
    assert [r.id for r in load_dataset(path, "mbj_bandgap").records] == [
        "JVASP-100",
        "JVASP-101",
        "JVASP-102",
    ]
    everything = load_dataset(path)
    assert set(everything.units) == {"formation_energy_peratom", "optb88vdw_bandgap", "mbj_bandgap"}
    assert len(everything) == 20 and "formation_energy_peratom" not in everything.records[0].targets


def test_jarvis_megnet_kind_renames_gap_and_uses_leaderboard_split_file(tmp_path):
    rows = []
    for row in jarvis_rows(12):
        rows.append(
            {
                "id": f"mp-{row['jid'][6:]}",
                "atoms": row["atoms"],
                "e_form": -1.0,
                "gap pbe": 0.5,
                "bulk modulus": "na",
            }
        )
    path = tmp_path / "some_mp_snapshot.json"
    path.write_text(json.dumps(rows))
    ds = load_dataset(path, ["e_form", "band_gap"], kind="megnet")
    assert ds.name == "megnet" and ds.units == {"e_form": "eV/atom", "band_gap": "eV"}
    assert ds.records[0].targets == {"e_form": -1.0, "band_gap": 0.5}
    # Not the full 69,239 entries: the paper's fractions of 12, not its fixed counts.
    assert ds.splits == paper_split(12, 10, 0, 0)
    split_file = tmp_path / "megnet_e_form.json.zip"
    with zipfile.ZipFile(split_file, "w") as z:
        z.writestr(
            "megnet_e_form.json",
            json.dumps(
                {
                    "train": {"mp-100": "-1.0", "mp-101": "-1.0"},
                    "val": {"mp-102": "0"},
                    "test": {"mp-103": "0", "mp-999": "0"},
                }
            ),
        )
    ds = load_dataset(path, kind="megnet", split_file=split_file)
    assert ids_by_split(ds) == {
        "train": ["mp-100", "mp-101"],
        "val": ["mp-102"],
        "test": ["mp-103"],
    }
    assert ds.provenance["split"]["missing_ids"] == {"train": 0, "val": 0, "test": 1}
    assert ds.provenance["split"]["missing_examples"] == {"test": ["mp-999"]}


def test_builtin_jarvis_names_find_the_jarvis_tools_file_in_the_data_dir(tmp_path):
    with pytest.raises(DataError, match=r"no jarvis-tools 'megnet' file.*figshare"):
        load_dataset("megnet", data_dir=tmp_path)
    rows = [
        {"id": r["jid"], "atoms": r["atoms"], "e_form": 0.1, "gap pbe": 0.0}
        for r in jarvis_rows(10)
    ]
    (tmp_path / "megnet.json").write_text(json.dumps(rows))
    ds = load_dataset("megnet", data_dir=tmp_path)
    assert ds.name == "megnet" and len(ds) == 10 and ds.splits == paper_split(10, 8, 0, 0)


def test_broken_jarvis_structure_is_skipped_and_leaves_other_splits_alone(tmp_path, caplog):
    rows = jarvis_rows()
    path = tmp_path / "dft_3d_2021-mini.json"
    path.write_text(json.dumps(rows))
    clean = load_dataset(path, "optb88vdw_bandgap")
    victim = clean.records[clean.splits["train"][0]].id
    i = next(k for k, r in enumerate(rows) if r["jid"] == victim)
    rows[i]["atoms"]["coords"][1] = rows[i]["atoms"]["coords"][0]  # two atoms on one site
    rows[i + 1]["atoms"]["elements"][0] = "Xx"  # unknown element
    path.write_text(json.dumps(rows))
    with caplog.at_level(logging.INFO, logger="ase_crystalformer.data"):
        broken = load_dataset(path, "optb88vdw_bandgap")
    reasons = dict(broken.skipped)
    assert set(reasons) == {victim, rows[i + 1]["jid"]}
    assert "overlapping" in reasons[victim] and "Xx" in reasons[rows[i + 1]["jid"]]
    assert victim in caplog.text
    assert len(broken) == len(clean) - 2
    for split in ("train", "val", "test"):  # same split, minus the skipped ids
        expected = [x for x in ids_by_split(clean)[split] if x not in reasons]
        assert ids_by_split(broken)[split] == expected


# -- built-in datasets on the trimmed fixtures ----------------------------------------------


MEGNET_SPLITS = {
    "train": [
        "mp-10",
        "mp-10000",
        "mp-10009",
        "mp-1025408",
        "mp-31628",
        "mp-510404",
        "mp-641778",
        "mp-774235",
        "mp-865981",
        "mp-995393",
    ],
    "val": ["mp-11668", "mp-622210", "mp-756188"],
    "test": ["mp-11131", "mp-39712", "mp-752930"],
}


def test_mp_megnet_follows_the_leaderboard_labels_and_split():
    ds = load_dataset("mp-megnet", data_dir=FIXTURES)
    assert {k: sorted(v) for k, v in ids_by_split(ds).items()} == MEGNET_SPLITS
    e_form = read_zip_json(FIXTURES / "jarvis_leaderboard/megnet_e_form.json.zip")
    gap = read_zip_json(FIXTURES / "jarvis_leaderboard/megnet_gappbe.json.zip")
    for split, indices in ds.splits.items():
        for i in indices:
            r = ds.records[i]
            assert r.targets == {
                "e_form": float(e_form[split][r.id]),
                "band_gap": float(gap[split][r.id]),
            }
    # The leaderboard lists 3 ids per split that have no structure: they are not records.
    assert ds.provenance["leaderboard_sizes"] == {"train": 13, "val": 6, "test": 6}
    assert ds.units == {"e_form": "eV/atom", "band_gap": "eV"} and ds.skipped == []


def test_mp_megnet_takes_each_structure_from_the_first_source_that_has_it():
    ds = load_dataset("mp-megnet", data_dir=FIXTURES)
    by_id = {r.id: r for r in ds.records}
    assert ds.provenance["structure_origin"] == {
        "mp20/val": 5,
        "mp20/test": 2,
        "mp_li/train": 2,
        "mp_li/val": 1,
        "mp40/part1.csv": 3,
        "mp40/part2.csv": 1,
        "mp_2015/flla_2015.csv": 2,
    }
    # In mp20/val and in mp_li/train (different relaxations): mp20 wins.
    mp20 = cache_atoms(FIXTURES / "mp20/val", "mp-995393")
    li = cache_atoms(FIXTURES / "mp_li/train", "mp-995393")
    assert not np.allclose(mp20.cell.array, li.cell.array)
    np.testing.assert_allclose(by_id["mp-995393"].atoms.positions, mp20.positions, atol=1e-12)
    # In mp20/val and mp40: the cache wins; in mp40 and mp_2015: mp40 wins.
    np.testing.assert_allclose(
        by_id["mp-1025408"].atoms.cell.array,
        cache_atoms(FIXTURES / "mp20/val", "mp-1025408").cell.array,
    )
    part1 = pd.read_csv(FIXTURES / "mp40/part1.csv").set_index("material_id")
    assert_same_crystal(by_id["mp-510404"].atoms, atoms_from_text(part1.loc["mp-510404", "cif"]))


def test_mp20_reads_both_caches_with_their_own_labels():
    ds = load_dataset("mp20", data_dir=FIXTURES)
    val = [str(s) for s in np.load(FIXTURES / "mp20/val/structure_id.npy")]
    test = [str(s) for s in np.load(FIXTURES / "mp20/test/structure_id.npy")]
    assert [r.id for r in ds.records] == val + test
    labels = json.loads((FIXTURES / "mp20/test/formation_energy_per_atom.json").read_text())[
        "values"
    ]
    assert ds.records[len(val)].targets["formation_energy_per_atom"] == labels[0]
    assert ds.provenance["split"]["method"] == "ratio"  # MP-20 has no train part here
    assert ds.splits == ratio_split(11, (0.8, 0.1, 0.1), seed=123)
    assert load_dataset("mp20", data_dir=FIXTURES, split="source").splits == {}
    assert load_dataset("mp20", data_dir=FIXTURES, seed=7).splits == ratio_split(11, seed=7)


ELASTIC_IDS = [
    "mp-10021",
    "mp-10063",
    "mp-101",
    "mp-1039148",
    "mp-12659",
    "mp-188",
    "mp-352",
    "mp-774",
    "mp-867189",
    "mp-975512",
]


def test_mp_elastic_precedence_and_paper_split_over_sorted_ids():
    ds = load_dataset("mp-elastic", data_dir=FIXTURES)
    assert [r.id for r in ds.records] == ELASTIC_IDS  # sorted as strings
    assert ds.splits == paper_split(10, 8, 1, 1, seed=123)
    assert ds.provenance["dropped_no_id"] == 1
    assert ds.provenance["duplicates_lower_precedence"] == 3
    with gzip.open(FIXTURES / "mp_elastic/mp-binary-pbe-elasticity-2025.1.json.gz", "rt") as h:
        m25 = {r["mp_id"]: r for r in json.load(h)}
    by_id = {r.id: r for r in ds.records}
    assert "mp-188" in m25  # also in the brgoch file, with other values: 2025 wins
    assert by_id["mp-188"].targets == {
        "k_vrh": m25["mp-188"]["bulk_modulus_vrh"],
        "g_vrh": m25["mp-188"]["shear_modulus_vrh"],
    }
    assert ds.units == {"k_vrh": "GPa", "g_vrh": "GPa"}


def test_mp_elastic_drops_non_positive_moduli(tmp_path):
    root = tmp_path / "data"
    shutil.copytree(FIXTURES / "mp_elastic", root / "mp_elastic")
    path = root / "mp_elastic/elastic_tensor_2015.csv"
    lines = path.read_text().splitlines(keepends=True)
    frame = pd.read_csv(path, skiprows=1)
    frame.loc[frame.material_id == "mp-10021", "K_VRH"] = 0.0
    with open(path, "w") as h:
        h.write(lines[0])
        frame.to_csv(h, index=False)
    ds = load_dataset("mp-elastic", data_dir=root)
    assert [r.id for r in ds.records] == [i for i in ELASTIC_IDS if i != "mp-10021"]
    assert ds.provenance["dropped_nonpositive_modulus"] == 1


def test_perov5_and_carbon24():
    perov = load_dataset("perov5", data_dir=FIXTURES)
    assert ids_by_split(perov) == {
        "train": ["6334", "17313", "6840", "11379"],
        "val": ["18517", "15400"],
        "test": ["3961", "11922"],
    }
    first = pd.read_csv(FIXTURES / "perov_5/train.csv").iloc[0]
    assert perov.records[0].targets == {
        t: first[t] for t in ("heat_all", "heat_ref", "dir_gap", "ind_gap")
    }
    assert len(perov.records[0].atoms) == 5
    carbon = load_dataset("carbon24", data_dir=FIXTURES, split="paper")
    assert len(carbon) == 10 and set(carbon.records[0].atoms.get_chemical_symbols()) == {"C"}
    assert carbon.splits == paper_split(10, 8, 1, 1)
    assert carbon.units == {"energy_per_atom": "eV/atom"}


def test_force_data_loads_energy_forces_and_stress():
    path = FIXTURES / "forces/mptrj-3.xyz"
    ds = load_dataset(path)
    from ase.io import read

    frames = read(path, ":")
    assert [r.id for r in ds.records] == [f.info["mptrj_snapshot_id"] for f in frames]
    for rec, frame in zip(ds.records, frames, strict=True):
        assert rec.targets == {"energy": frame.get_potential_energy()}
        np.testing.assert_array_equal(rec.forces, frame.get_forces())
        np.testing.assert_array_equal(rec.stress, frame.get_stress())
        assert rec.forces.shape == (len(frame), 3) and rec.stress.shape == (6,)
        assert rec.atoms.calc is None and rec.atoms == Atoms(
            frame.numbers, frame.positions, cell=frame.cell, pbc=frame.pbc
        )
    assert ds.units == {"energy": "eV"}


def test_data_dir_comes_from_the_argument_or_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("CRYSTALFORMER_DATA_DIR", raising=False)
    with pytest.raises(DataError, match="data_dir=.*CRYSTALFORMER_DATA_DIR"):
        load_dataset("perov5")
    monkeypatch.setenv("CRYSTALFORMER_DATA_DIR", str(FIXTURES))
    assert len(load_dataset("perov5")) == 8
    with pytest.raises(DataError, match=r"lacks \['perov_5/train.csv'"):
        load_dataset("perov5", data_dir=tmp_path)
    with pytest.raises(DataError, match="neither a built-in dataset"):
        load_dataset("no-such-dataset")


# -- user files ---------------------------------------------------------------------------


def user_frame(structures: list[Atoms]) -> pd.DataFrame:
    from pymatgen.io.ase import AseAtomsAdaptor
    from pymatgen.io.cif import CifWriter

    cifs = [str(CifWriter(AseAtomsAdaptor.get_structure(a))) for a in structures]
    return pd.DataFrame(
        {
            "material_id": [f"x-{i}" for i in range(len(structures))],
            "cif": cifs,
            "band_gap": [0.5, np.nan, 2.0][: len(structures)],
            "e_form": [-1.0, -2.0, -3.0][: len(structures)],
            "note": ["a", "b", "c"][: len(structures)],
        }
    )


def test_csv_round_trip_with_cif_and_poscar(tmp_path):
    structures = crystals()
    path = tmp_path / "mine.csv"
    user_frame(structures).to_csv(path, index=False)
    ds = load_dataset(path)
    assert ds.units == {"band_gap": "", "e_form": ""}  # numeric columns; units unknown
    assert [r.id for r in ds.records] == ["x-0", "x-1", "x-2"]
    assert ds.records[1].targets == {"e_form": -2.0}  # NaN gap: key absent
    for rec, ref in zip(ds.records, structures, strict=True):
        assert_same_crystal(rec.atoms, ref)
    assert [r.id for r in load_dataset(path, ["band_gap", "e_form"]).records] == ["x-0", "x-2"]

    import io

    from ase.io import write

    poscars = []
    for a in structures:
        buf = io.StringIO()
        write(buf, a, format="vasp", direct=True)
        poscars.append(buf.getvalue())
    path2 = tmp_path / "poscar.csv"
    pd.DataFrame({"POSCAR": poscars, "y": [1.0, 2.0, 3.0]}).to_csv(path2, index=False)
    ds2 = load_dataset(path2)
    assert [r.id for r in ds2.records] == ["poscar:0", "poscar:1", "poscar:2"]
    for rec, ref in zip(ds2.records, structures, strict=True):
        np.testing.assert_allclose(rec.atoms.positions, ref.positions, atol=1e-6)
        np.testing.assert_allclose(rec.atoms.cell.array, ref.cell.array, atol=1e-6)


def test_csv_broken_rows_are_skipped_with_id_and_reason(tmp_path, caplog):
    frame = user_frame(crystals())
    frame.loc[1, "cif"] = "data_broken\n_cell_length_a 1\nnonsense"
    overlapping = crystals()[0].copy()
    overlapping.positions[1] = overlapping.positions[0] + 0.01
    frame.loc[2, "cif"] = user_frame([overlapping])["cif"][0]
    path = tmp_path / "broken.csv"
    frame.to_csv(path, index=False)
    with caplog.at_level(logging.INFO, logger="ase_crystalformer.data"):
        ds = load_dataset(path, "e_form")
    assert [r.id for r in ds.records] == ["x-0"]
    reasons = dict(ds.skipped)
    assert set(reasons) == {"x-1", "x-2"}
    assert "CIF" in reasons["x-1"] and "overlapping" in reasons["x-2"]
    assert "x-2" in caplog.text and ds.provenance["n_skipped"] == 2
    # Indices of the splits point at surviving records only.
    assert sorted(i for v in ds.splits.values() for i in v) == [0]


def test_extxyz_round_trip(tmp_path):
    from ase.io import write

    structures = crystals()
    rng = np.random.default_rng(0)
    for i, atoms in enumerate(structures):
        atoms.info.update(
            {"name": f"frame-{i}", "band_gap": 0.1 * i, "split": ["train", "val", "test"][i]}
        )
        atoms.calc = SinglePointCalculator(
            atoms,
            energy=-3.0 * len(atoms) - i,
            forces=rng.normal(size=(len(atoms), 3)),
            stress=rng.normal(size=6) * 1e-3,
        )
    path = tmp_path / "frames.extxyz"
    write(path, structures, format="extxyz")
    ds = load_dataset(path)
    assert [r.id for r in ds.records] == ["frame-0", "frame-1", "frame-2"]
    assert ids_by_split(ds) == {"train": ["frame-0"], "val": ["frame-1"], "test": ["frame-2"]}
    for rec, ref in zip(ds.records, structures, strict=True):
        np.testing.assert_allclose(rec.atoms.positions, ref.positions, atol=1e-8)
        np.testing.assert_allclose(rec.atoms.cell.array, ref.cell.array, atol=1e-8)
        assert rec.targets == pytest.approx(
            {"energy": ref.get_potential_energy(), "band_gap": ref.info["band_gap"]}
        )
        np.testing.assert_allclose(rec.forces, ref.get_forces(), atol=1e-8)
        np.testing.assert_allclose(rec.stress, ref.get_stress(), atol=1e-10)


def test_ase_db_round_trip(tmp_path):
    from ase.db import connect

    structures = crystals()
    path = tmp_path / "mine.db"
    with connect(path) as db:
        for i, atoms in enumerate(structures):
            db.write(atoms, material_id=f"db-{i}", band_gap=0.5 * i, data={"k_vrh": 100.0 + i})
    ds = load_dataset(path)
    assert [r.id for r in ds.records] == ["db-0", "db-1", "db-2"]
    for i, (rec, ref) in enumerate(zip(ds.records, structures, strict=True)):
        np.testing.assert_allclose(rec.atoms.positions, ref.positions)
        np.testing.assert_allclose(rec.atoms.cell.array, ref.cell.array)
        assert rec.targets == {"band_gap": 0.5 * i, "k_vrh": 100.0 + i}
    assert ds.units == {"band_gap": "", "k_vrh": ""}


def test_pymatgen_json_round_trip(tmp_path):
    from pymatgen.io.ase import AseAtomsAdaptor

    structures = crystals()
    pmg = [AseAtomsAdaptor.get_structure(a) for a in structures]
    path = tmp_path / "mine.json"
    path.write_text(
        json.dumps(
            [
                {"structure": s.as_dict(), "mp_id": f"p-{i}", "band_gap": 1.0 + i}
                for i, s in enumerate(pmg)
            ]
        )
    )
    ds = load_dataset(path)
    assert [r.id for r in ds.records] == ["p-0", "p-1", "p-2"]
    for i, (rec, ref) in enumerate(zip(ds.records, structures, strict=True)):
        np.testing.assert_allclose(rec.atoms.positions, ref.positions, atol=1e-10)
        np.testing.assert_allclose(rec.atoms.cell.array, ref.cell.array, atol=1e-10)
        assert rec.targets == {"band_gap": 1.0 + i}
    # Structure dicts carrying their labels in ``properties``.
    for i, s in enumerate(pmg):
        s.properties = {"material_id": f"q-{i}", "e_form": -float(i)}
    path2 = tmp_path / "structures.json.gz"
    with gzip.open(path2, "wt") as h:
        json.dump([s.as_dict() for s in pmg], h)
    ds2 = load_dataset(path2)
    assert [r.id for r in ds2.records] == ["q-0", "q-1", "q-2"]
    assert [r.targets for r in ds2.records] == [{"e_form": 0.0}, {"e_form": -1.0}, {"e_form": -2.0}]
    assert_same_crystal(ds2.records[2].atoms, structures[2], atol=1e-10)


def test_split_files_json_and_text(tmp_path):
    path = tmp_path / "mine.csv"
    user_frame(crystals()).to_csv(path, index=False)
    as_json = tmp_path / "split.json"
    as_json.write_text(
        json.dumps({"train": ["x-2", "x-0"], "valid": [], "test": [{"x-1": 3.0}, "x-9"]})
    )
    ds = load_dataset(path, split_file=as_json)
    assert ids_by_split(ds) == {"train": ["x-2", "x-0"], "val": [], "test": ["x-1"]}
    assert ds.provenance["split"]["missing_examples"] == {"test": ["x-9"]}
    as_text = tmp_path / "split.txt"
    as_text.write_text("# split id\ntrain x-1\ntest, x-0\nval: x-2\n")
    assert ids_by_split(load_dataset(path, split_file=as_text)) == {
        "train": ["x-1"],
        "test": ["x-0"],
        "val": ["x-2"],
    }
    with pytest.raises(DataError, match="either split_file= or split="):
        load_dataset(path, split_file=as_text, split="ratio")


def test_unknown_target_names_it_and_lists_the_available_ones(tmp_path):
    with pytest.raises(DataError, match=r"unknown target\(s\) \['gap'\].*e_form.*band_gap"):
        load_dataset("mp-megnet", ["gap"], data_dir=FIXTURES)
    path = tmp_path / "mine.csv"
    user_frame(crystals()).to_csv(path, index=False)
    with pytest.raises(DataError, match=r"\['nope'\]; available: \['band_gap', 'e_form'\]"):
        load_dataset(path, ["nope"])


def test_a_non_numeric_or_empty_target_column_says_what_is_wrong(tmp_path):
    frame = user_frame(crystals())
    frame["note"] = ["a", "b", "c"]
    frame["mixed"] = ["1.0", "2.0", "abc"]
    frame["blank"] = np.nan
    path = tmp_path / "mine.csv"
    frame.to_csv(path, index=False)
    available = "available: ['band_gap', 'e_form']"
    cases = {
        "note": "column 'note' has no numeric values (first bad value 'a' in row 0)",
        "mixed": "column 'mixed' has non-numeric values (first bad value 'abc' in row 2; 1 of 3 rows)",
        "blank": "column 'blank' is empty",
    }
    for column, problem in cases.items():
        with pytest.raises(DataError) as info:
            load_dataset(path, [column])
        assert str(info.value) == f"mine.csv: {problem}; {available}"
    assert load_dataset(path).targets == ["band_gap", "e_form"]  # an empty column is no target
    # Only the structure column and an empty one: nothing numeric at all.
    only = tmp_path / "only.csv"
    frame[["cif", "blank"]].to_csv(only, index=False)
    with pytest.raises(DataError, match=r"^only.csv: column 'blank' is empty; available: none$"):
        load_dataset(only, "blank")
    # JSON keys, and a numeric key that is NaN everywhere.
    from pymatgen.io.ase import AseAtomsAdaptor

    rows = [{"structure": AseAtomsAdaptor.get_structure(a).as_dict(), "label": "metal", "gap": float("nan")}
            for a in crystals()]
    as_json = tmp_path / "mine.json"
    as_json.write_text(json.dumps(rows))
    with pytest.raises(DataError, match=r"key 'label' has no numeric values \(first bad value 'metal' in entry 0\)"):
        load_dataset(as_json, "label")
    with pytest.raises(DataError, match=r"target\(s\) \['gap'\] have no finite value in any of the 3 entries"):
        load_dataset(as_json, "gap")


def test_primitive_cells_replace_conventional_ones(tmp_path):
    conventional = bulk("Cu", "fcc", a=3.6, cubic=True)
    path = tmp_path / "cu.csv"
    frame = user_frame([conventional])
    frame.to_csv(path, index=False)
    assert len(load_dataset(path).records[0].atoms) == 4
    prim = load_dataset(path, primitive=True).records[0].atoms
    assert len(prim) == 1
    np.testing.assert_allclose(prim.get_volume(), conventional.get_volume() / 4)
    # Force data keeps its cell: the forces belong to those atoms.
    conventional.calc = SinglePointCalculator(conventional, energy=-1.0, forces=np.zeros((4, 3)))
    from ase.io import write

    write(tmp_path / "cu.xyz", conventional, format="extxyz")
    ds = load_dataset(tmp_path / "cu.xyz", primitive=True)
    assert len(ds.records[0].atoms) == 4 and ds.provenance["primitive_not_applied_force_data"] == 1


def test_fast_p1_cif_reader_matches_pymatgen_and_defers_other_cifs():
    import warnings

    from pymatgen.core import Structure
    from pymatgen.io.cif import CifWriter

    texts = list(pd.read_csv(FIXTURES / "perov_5/train.csv").cif)
    texts += list(pd.read_csv(FIXTURES / "mp40/part1.csv").cif)
    for text in texts:
        fast = read_p1_cif(text)
        assert fast is not None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            slow = atoms_from_structure(Structure.from_str(text, fmt="cif"))
        np.testing.assert_allclose(fast.cell.array, slow.cell.array, atol=1e-10)
        # Same sites up to order (pymatgen sorts species and snaps 0.3333 to 1/3).
        d = fast.get_scaled_positions()[:, None] - slow.get_scaled_positions()[None]
        dist = np.abs(d - np.round(d)).max(-1)
        dist[fast.numbers[:, None] != slow.numbers[None]] = 1.0
        assert dist.min(axis=1).max() < 1e-4 and len(fast) == len(slow)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # spglib's error-handling notice
        symmetric = str(CifWriter(Structure.from_str(texts[0], fmt="cif"), symprec=0.1))
    assert "x, y, z" in symmetric and read_p1_cif(symmetric) is None
    assert len(atoms_from_text(symmetric)) == 5  # pymatgen expands the symmetry


# -- cache --------------------------------------------------------------------------------


def test_cache_round_trip_skips_parsing_on_the_second_load(tmp_path, monkeypatch, caplog):
    cache = tmp_path / "cache"
    first = load_dataset("mp-megnet", data_dir=FIXTURES, cache_dir=cache)
    assert len(list(cache.glob("*.npz"))) == 1

    def no_parsing(*args, **kwargs):
        raise AssertionError("parsed again instead of using the cache")

    monkeypatch.setattr(data_pkg, "assemble", no_parsing)
    second = load_dataset("mp-megnet", data_dir=FIXTURES, cache_dir=cache)
    assert second.records == first.records and second.splits == first.splits
    assert second.units == first.units and second.provenance == first.provenance
    assert isinstance(second.records[0], Record)
    # Other options are another cache entry, hence parsed.
    with pytest.raises(AssertionError, match="parsed again"):
        load_dataset("mp-megnet", ["e_form"], data_dir=FIXTURES, cache_dir=cache)
    # A corrupted cache file is rebuilt, not trusted.
    monkeypatch.undo()
    next(cache.glob("*.npz")).write_bytes(b"not a pickle")
    with caplog.at_level(logging.WARNING, logger="ase_crystalformer.data"):
        third = load_dataset("mp-megnet", data_dir=FIXTURES, cache_dir=cache)
    assert "unreadable" in caplog.text and third.records == first.records


def test_cache_notices_a_changed_file(tmp_path):
    path = tmp_path / "mine.csv"
    user_frame(crystals()).to_csv(path, index=False)
    cache = tmp_path / "cache"
    assert len(load_dataset(path, cache_dir=cache)) == 3
    user_frame(crystals()[:2]).to_csv(path, index=False)
    assert len(load_dataset(path, cache_dir=cache)) == 2


def test_dataset_helpers():
    ds = load_dataset("perov5", data_dir=FIXTURES)
    assert [r.id for r in ds.subset("val")] == ["18517", "15400"]
    assert ds.values("heat_all", "test").shape == (2,)
    assert ds.targets == ["heat_all", "heat_ref", "dir_gap", "ind_gap"]
    with pytest.raises(DataError, match="no split 'dev'"):
        ds.subset("dev")
    json.dumps(ds.provenance)  # goes into checkpoint metadata


class _PlantedPayload:
    """Unpickling this creates ``marker``: the proof that a cache file ran code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.mkdir, (str(self.marker),))


def test_cache_never_unpickles_a_planted_file(tmp_path, caplog):
    import pickle

    cache = tmp_path / "cache"
    first = load_dataset("mp-megnet", data_dir=FIXTURES, cache_dir=cache)
    marker = tmp_path / "code-ran"
    (entry,) = [p for p in cache.iterdir() if p.is_file()]
    entry.write_bytes(pickle.dumps(_PlantedPayload(marker)))
    with caplog.at_level(logging.WARNING, logger="ase_crystalformer.data"):
        second = load_dataset("mp-megnet", data_dir=FIXTURES, cache_dir=cache)
    assert not marker.exists()
    assert "rebuilding unreadable dataset cache" in caplog.text and str(entry) in caplog.text
    assert second.records == first.records
    assert pickle.dumps(_PlantedPayload(marker)) not in entry.read_bytes()  # rebuilt in place


def test_cache_rebuilds_a_foreign_stale_or_truncated_entry(tmp_path, caplog):
    cache = tmp_path / "cache"
    mine, other = tmp_path / "mine.csv", tmp_path / "other.csv"
    user_frame(crystals()).to_csv(mine, index=False)
    user_frame(crystals()[:2]).to_csv(other, index=False)
    fresh = load_dataset(mine, cache_dir=cache)
    load_dataset(other, cache_dir=cache)
    mine_entry, other_entry = (next(cache.glob(f"{name}-*")) for name in ("mine.csv", "other.csv"))
    # Another file's entry under this file's name (a copied cache folder, a stale key).
    shutil.copyfile(other_entry, mine_entry)
    with caplog.at_level(logging.WARNING, logger="ase_crystalformer.data"):
        again = load_dataset(mine, cache_dir=cache)
    assert [r.id for r in again.records] == ["x-0", "x-1", "x-2"] and again.records == fresh.records
    assert "written for other data" in caplog.text
    # A truncated entry (a full disk, a copy stopped halfway).
    data = mine_entry.read_bytes()
    mine_entry.write_bytes(data[: len(data) // 2])
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ase_crystalformer.data"):
        assert load_dataset(mine, cache_dir=cache).records == fresh.records
    assert "rebuilding unreadable dataset cache" in caplog.text


def test_cache_round_trip_keeps_forces_stress_skipped_and_windows(tmp_path):
    from ase_crystalformer.geometry import build_window

    path = tmp_path / "frames.xyz"
    shutil.copyfile(FIXTURES / "forces/mptrj-3.xyz", path)
    cache = tmp_path / "cache"
    fresh = load_dataset(path, split="ratio", cache_dir=cache)
    cached = load_dataset(path, split="ratio", cache_dir=cache)
    assert "cache_file" in fresh.provenance
    assert cached.records == fresh.records and cached.splits == fresh.splits
    assert cached.provenance == fresh.provenance and cached.units == fresh.units
    assert all(r.forces is not None and r.stress is not None for r in cached.records)
    for a, b in zip(fresh.records, cached.records, strict=True):
        wa, wb = build_window(a.atoms, 6.0), build_window(b.atoms, 6.0)
        for field in dataclasses.fields(wa):
            np.testing.assert_array_equal(getattr(wa, field.name), getattr(wb, field.name))
    # Skipped rows survive the cache with their reasons.
    frame = user_frame(crystals())
    frame.loc[1, "cif"] = "data_broken\n_cell_length_a 1\nnonsense"
    broken = tmp_path / "broken.csv"
    frame.to_csv(broken, index=False)
    first = load_dataset(broken, cache_dir=cache)
    assert load_dataset(broken, cache_dir=cache).skipped == first.skipped != []


# -- bounded parsing of dict cells ----------------------------------------------------------


def test_dict_cells_are_bounded_and_bad_ones_are_reported_rows(tmp_path):
    from ase_crystalformer.data.parse import MAX_LITERAL_CHARS, atoms_from_text

    frame = user_frame(crystals())
    # A Python-literal dict just over the limit: refused before ast runs, with the limit named.
    long_literal = "{'sites': [" + " " * (MAX_LITERAL_CHARS - 12) + "]}"
    assert len(long_literal) == MAX_LITERAL_CHARS + 1
    with pytest.raises(DataError, match=f"limit of {MAX_LITERAL_CHARS:,} characters"):
        atoms_from_text(long_literal)
    # Nesting that makes ast raise MemoryError, and JSON that makes json raise RecursionError.
    deep_literal = "{'a': " + "-" * 100_000 + "1}"
    with pytest.raises(DataError, match="nested too deeply to read as a Python literal"):
        atoms_from_text(deep_literal)
    deep_json = '{"a": ' + "[" * 100_000 + "]" * 100_000 + "}"
    with pytest.raises(DataError, match="nested too deeply to read as JSON"):
        atoms_from_text(deep_json)
    with pytest.raises(DataError, match="neither JSON nor a Python literal"):
        atoms_from_text("{'a': os.system('true')}")
    # In a training file each is one skipped row with its id, cell and reason; the rest load.
    frame["cif"] = frame["cif"].astype(object)
    frame.loc[0, "cif"] = deep_literal
    frame.loc[1, "cif"] = long_literal
    path = tmp_path / "dicts.csv"
    frame.to_csv(path, index=False)
    ds = load_dataset(path, "e_form")
    assert [r.id for r in ds.records] == ["x-2"]
    reasons = dict(ds.skipped)
    assert reasons["x-0"].startswith("row 0, column 'cif': structure dict nested too deeply")
    assert reasons["x-1"].startswith("row 1, column 'cif': structure text of")


def test_a_deeply_nested_json_file_is_a_data_error(tmp_path):
    path = tmp_path / "deep.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(DataError, match=r"deep.json: cannot read JSON \(RecursionError"):
        load_dataset(path)
