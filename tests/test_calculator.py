"""The ASE calculator: derivatives against finite differences, the ASE contract, batching."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk
from ase.calculators.calculator import Calculator, CalculatorSetupError, PropertyNotImplementedError
from ase.calculators.fd import calculate_numerical_forces, calculate_numerical_stress
from ase.io import read, write

from ase_crystalformer import Crystalformer, ModelConfig, StructureError, TargetSpec, inference
from ase_crystalformer import calculator as calculator_module
from ase_crystalformer.calculator import CrystalformerCalculator
from ase_crystalformer.checkpoint import save_checkpoint
from ase_crystalformer.errors import CheckpointError

ENERGY = TargetSpec("energy", "eV/atom", kind="energy")


def tiny_model(*targets: TargetSpec, seed: int = 0, cutoff: float = 7.0) -> Crystalformer:
    """A one-block SiLU model (smooth, so finite differences converge) with a large output
    scale so that forces are well above rounding noise."""
    torch.manual_seed(seed)
    config = ModelConfig(
        n_blocks=1, d_model=32, n_heads=4, d_ff=64, d_head_mlp=32, n_rbf=16,
        activation="silu", cutoff=cutoff, targets=targets or (ENERGY,),
    )
    model = Crystalformer(config)
    with torch.no_grad():
        model.target_std.fill_(20.0)
        for block in model.blocks:
            block.attention.sigma_weight.mul_(4.0)  # atom-dependent widths: larger gradients
    return model.eval()


def random_triclinic(seed: int, n: int = 3) -> Atoms:
    """A skewed cell with atoms at least 1.2 Å apart (periodic images included)."""
    rng = np.random.default_rng(seed)
    cell = np.diag(rng.uniform(3.2, 4.2, 3)) + rng.uniform(-0.8, 0.8, (3, 3))
    while True:
        atoms = Atoms(
            numbers=rng.choice([3, 8, 14, 26], n), scaled_positions=rng.random((n, 3)),
            cell=cell, pbc=True,
        )
        d = atoms.get_all_distances(mic=True) + 10 * np.eye(n)
        if d.min() > 1.2:
            return atoms


def slab(seed: int = 1) -> Atoms:
    """A rattled 4-atom slab, periodic in x and y only, with vacuum along z."""
    atoms = bulk("MgO", "rocksalt", a=4.2, cubic=True)[:4]
    atoms.center(vacuum=5.0, axis=2)
    atoms.pbc = (True, True, False)
    atoms.rattle(0.1, seed=seed)
    return atoms


@pytest.fixture(scope="module")
def energy_calc() -> CrystalformerCalculator:
    return CrystalformerCalculator(tiny_model(), dtype="float64", device="cpu")


@pytest.mark.parametrize("make", [lambda: random_triclinic(0), lambda: random_triclinic(7, 4), slab])
def test_forces_are_minus_the_energy_gradient(energy_calc, make) -> None:
    atoms = make()
    atoms.calc = energy_calc
    forces = atoms.get_forces()
    numeric = calculate_numerical_forces(atoms, eps=1e-4)
    scale = np.abs(numeric).max()
    assert scale > 1e-4  # the test has signal
    np.testing.assert_allclose(forces, numeric, atol=1e-6 * scale)
    if np.all(atoms.pbc):  # E is translation invariant, so the forces sum to zero
        np.testing.assert_allclose(forces.sum(0), 0.0, atol=1e-10 * len(atoms) * scale)


@pytest.mark.parametrize("make", [lambda: random_triclinic(0), lambda: random_triclinic(3), slab])
def test_stress_is_strain_derivative_over_volume(energy_calc, make) -> None:
    atoms = make()
    atoms.calc = energy_calc
    stress = atoms.get_stress()
    numeric = calculate_numerical_stress(atoms, eps=1e-5)
    scale = np.abs(numeric).max()
    assert stress.shape == (6,) and scale > 1e-6
    np.testing.assert_allclose(stress, numeric, atol=1e-5 * scale)


def test_stress_needs_a_cell_volume(energy_calc) -> None:
    wire = Atoms("C2", positions=[[0, 0, 0], [0, 0, 1.3]], cell=[0, 0, 2.6], pbc=[False, False, True])
    wire.calc = energy_calc
    assert wire.get_forces().shape == (2, 3)
    with pytest.raises(PropertyNotImplementedError, match="non-zero volume"):
        wire.get_stress()
    with pytest.raises(PropertyNotImplementedError, match="non-zero volume"):
        energy_calc.predict([wire], properties=["stress"])
    assert "stress" not in energy_calc.predict([wire])[0]  # default skips it without a volume


def test_custom_properties_and_info_round_trip(tmp_path) -> None:
    model = tiny_model(ENERGY, TargetSpec("e_form"), TargetSpec("k_vrh", transform="log10")).double()
    calc = CrystalformerCalculator(model, dtype="float64", device="cpu")
    assert calc.implemented_properties == [
        "energy", "free_energy", "forces", "stress",
        "energy_per_atom", "formation_energy_per_atom", "bulk_modulus_vrh", "embedding",
    ]
    assert calc.units["bulk_modulus_vrh"] == "GPa"
    assert calc.units["formation_energy_per_atom"] == "eV/atom"
    atoms = random_triclinic(2)
    expected = model.predict([atoms])[0]
    with torch.no_grad():
        embedding = model.embed(model.make_batch([atoms]))[0].numpy()
    atoms.calc = calc
    for k, name in enumerate(["energy_per_atom", "formation_energy_per_atom", "bulk_modulus_vrh"]):
        assert calc.get_property(name, atoms) == pytest.approx(expected[k], rel=1e-12)
    np.testing.assert_allclose(calc.get_property("embedding", atoms), embedding, rtol=1e-12)
    assert atoms.get_potential_energy() == pytest.approx(3 * expected[0], rel=1e-12)
    assert atoms.info["crystalformer_bulk_modulus_vrh"] == pytest.approx(expected[2])

    atoms.get_forces()
    write(tmp_path / "out.extxyz", atoms)
    back = read(tmp_path / "out.extxyz")
    assert back.info["crystalformer_formation_energy_per_atom"] == pytest.approx(expected[1])
    np.testing.assert_allclose(back.info["crystalformer_embedding"], embedding, rtol=1e-6)
    np.testing.assert_allclose(back.get_forces(), atoms.get_forces(), atol=1e-7)  # 8 decimals


def test_batch_predict_equals_single_calls() -> None:
    calc = CrystalformerCalculator(tiny_model(ENERGY, TargetSpec("bandgap")), dtype="float64", device="cpu")
    frames = [random_triclinic(s, n) for s, n in [(0, 3), (1, 2), (2, 5), (4, 1)]]
    batched = calc.predict(frames, batch_size=3)
    for atoms, got in zip(frames, batched):
        single = CrystalformerCalculator(calc.models[0][1], dtype="float64", device="cpu")
        atoms.calc = single
        assert got["energy"] == pytest.approx(atoms.get_potential_energy(), rel=1e-10)
        assert got["band_gap"] == pytest.approx(single.get_property("band_gap", atoms), rel=1e-10)
        np.testing.assert_allclose(got["forces"], atoms.get_forces(), atol=1e-12, rtol=1e-9)
        np.testing.assert_allclose(got["stress"], atoms.get_stress(), atol=1e-14, rtol=1e-9)
        np.testing.assert_allclose(got["embedding"], single.get_property("embedding", atoms), rtol=1e-10)
    stacked = calc.predict(frames, properties=["band_gap", "forces", "embedding"], output="dict")
    assert stacked["band_gap"].shape == (4,) and stacked["embedding"].shape == (4, 32)
    assert [f.shape for f in stacked["forces"]] == [(3, 3), (2, 3), (5, 3), (1, 3)]
    full = calc.predict(frames, output="dict")
    empty = calc.predict([], output="dict")
    assert empty.keys() == full.keys() and empty["forces"] == []
    for name in full.keys() - {"forces"}:
        assert empty[name].shape == (0, *full[name].shape[1:]), name


def test_missing_energy_model_says_which_models_provide_it() -> None:
    calc = CrystalformerCalculator(tiny_model(TargetSpec("e_form")), device="cpu")
    assert "energy" not in calc.implemented_properties
    atoms = random_triclinic(0)
    atoms.calc = calc
    for getter in (atoms.get_potential_energy, atoms.get_forces, atoms.get_stress):
        with pytest.raises(PropertyNotImplementedError, match="kind='energy'") as info:
            getter()
        assert "model0 (e_form)" in str(info.value)
    with pytest.raises(PropertyNotImplementedError, match="kind='energy'"):
        calc.predict([atoms], properties=["forces"])
    with pytest.raises(PropertyNotImplementedError, match="dipole"):
        calc.predict([atoms], properties=["dipole"])
    # The per-instance list never leaks into the base classes.
    assert Calculator.implemented_properties == []
    assert CrystalformerCalculator.implemented_properties == []


def test_several_models_share_one_window_per_structure(monkeypatch) -> None:
    calls = []
    original = calculator_module.windows_for

    def counting(atoms_list, cutoff):
        calls.append((len(atoms_list), cutoff))
        return original(atoms_list, cutoff)

    monkeypatch.setattr(calculator_module, "windows_for", counting)
    models = [
        tiny_model(TargetSpec("bandgap"), seed=1),
        tiny_model(TargetSpec("band_gap"), ENERGY, seed=2),
        tiny_model(TargetSpec("mbj_bandgap"), seed=3, cutoff=7.5),
    ]
    calc = CrystalformerCalculator(models, device="cpu")
    assert [t.name for t in calc.targets] == ["band_gap", "band_gap_model1", "energy_per_atom", "band_gap_mbj"]
    calc.predict([random_triclinic(0), random_triclinic(1)])
    assert sorted(calls) == [(2, 7.0), (2, 7.5)]  # one neighbour search per cutoff
    # energy comes from the first energy-type target, in model 1
    out = calc.predict([random_triclinic(0)], properties=["energy", "energy_per_atom"])[0]
    assert out["energy"] == pytest.approx(3 * out["energy_per_atom"])


def test_results_reset_when_atoms_change(energy_calc) -> None:
    atoms = random_triclinic(5)
    atoms.calc = energy_calc
    e0 = atoms.get_potential_energy()
    atoms.set_initial_magnetic_moments(np.ones(len(atoms)))  # ignored: no recalculation
    assert energy_calc.check_state(atoms) == []
    atoms.positions[0] += 0.05
    assert "positions" in energy_calc.check_state(atoms)
    e1 = atoms.get_potential_energy()
    assert e1 != e0
    energy_calc.calculate(atoms, ["energy"], ["positions"])
    assert energy_calc.results["energy"] == pytest.approx(e1)
    assert set(energy_calc.results) >= {"energy", "energy_per_atom", "embedding"}


def test_loading_by_path_and_default(tmp_path, monkeypatch) -> None:
    save_checkpoint(tiny_model(ENERGY), tmp_path / "tiny-energy" / "model.safetensors")
    calc = CrystalformerCalculator(str(tmp_path / "tiny-energy"), device="cpu")
    assert calc.parameters["models"] == ["tiny-energy"]
    monkeypatch.setattr(inference, "list_models", list)
    with pytest.raises(CheckpointError, match="no shipped model"):
        CrystalformerCalculator()
    monkeypatch.setattr(inference, "list_models", lambda: [str(tmp_path / "tiny-energy")])
    # an energy-type regressor gives energy only when named (above), never by default
    assert "energy" not in CrystalformerCalculator(device="cpu").implemented_properties


def test_setup_errors(energy_calc) -> None:
    with pytest.raises(TypeError, match="dtyp"):
        CrystalformerCalculator(tiny_model(), dtyp="float64")
    with pytest.raises(ValueError, match="float16"):
        CrystalformerCalculator(tiny_model(), dtype="float16")
    with pytest.raises(CalculatorSetupError, match="device"):
        energy_calc.set(device="cuda")
    with pytest.raises(CalculatorSetupError, match=r"unknown parameter\(s\) \['batchsize'\]"):
        energy_calc.set(batchsize=8)
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        energy_calc.set(batch_size=0)
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        energy_calc.predict([random_triclinic(0)], batch_size=0)
    energy_calc.set(batch_size=8)
    assert energy_calc.parameters["batch_size"] == 8


def test_bad_structures_raise_structure_error(energy_calc) -> None:
    atoms = Atoms("Na2", positions=[[0, 0, 0], [0.01, 0, 0]], cell=np.eye(3) * 4, pbc=True)
    assert energy_calc.precheck(atoms)  # overlap is found by the neighbour search only
    with pytest.raises(StructureError, match="overlapping"):
        energy_calc.predict([random_triclinic(0), atoms])
    molecule = Atoms("H2", positions=[[0, 0, 0], [0.7, 0, 0]])
    assert not energy_calc.precheck(molecule)
    molecule.calc = energy_calc
    with pytest.raises(StructureError, match="no periodic axis"):
        molecule.get_potential_energy()


def test_global_torch_state_is_untouched() -> None:
    before = (
        torch.get_default_dtype(), torch.is_grad_enabled(), torch.get_float32_matmul_precision(),
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
    )
    calc = CrystalformerCalculator(tiny_model(), dtype="float64", device="cpu")
    atoms = random_triclinic(0)
    atoms.calc = calc
    atoms.get_stress()
    with torch.no_grad():  # forces need autograd even inside a caller's no_grad
        assert np.isfinite(calc.predict([random_triclinic(1)], properties=["forces"])[0]["forces"]).all()
    after = (
        torch.get_default_dtype(), torch.is_grad_enabled(), torch.get_float32_matmul_precision(),
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
    )
    assert before == after


def test_user_model_is_not_modified() -> None:
    model = tiny_model()
    model.train()
    CrystalformerCalculator(model, dtype="float64", device="cpu").predict([random_triclinic(0)])
    assert model.dtype == torch.float32 and model.training


def test_ase_plugin_resolves_to_the_calculator() -> None:
    plugins = pytest.importorskip("ase._4.plugins.plugin")
    from ase_crystalformer import ase_plugin

    (plugin,) = ase_plugin.__ase_plugins__
    assert isinstance(plugin, plugins.CalculatorPlugin)
    assert plugin.implementation is CrystalformerCalculator


def test_one_calculator_shared_by_threads_gives_each_its_own_results() -> None:
    """Threads share one calculator (ASE keeps the last structure and results on it)."""
    from concurrent.futures import ThreadPoolExecutor

    calc = CrystalformerCalculator(tiny_model(ENERGY, TargetSpec("bandgap", "eV")), device="cpu")
    structures = [random_triclinic(seed, n) for seed, n in [(0, 3), (3, 3), (7, 4), (11, 2)]]
    expected = [
        (calc.get_potential_energy(a), calc.get_forces(a), calc.get_property("band_gap", a))
        for a in structures
    ]

    def run(k: int) -> list[tuple[int, float, np.ndarray, float]]:
        out = []
        for step in range(30):
            i = (k + step) % len(structures)
            atoms = structures[i].copy()
            out.append((i, calc.get_potential_energy(atoms), calc.get_forces(atoms),
                        calc.get_property("band_gap", atoms)))
        return out

    with ThreadPoolExecutor(4) as pool:
        results = [r for part in pool.map(run, range(4)) for r in part]
    assert len(results) == 120
    for i, energy, forces, gap in results:
        assert energy == expected[i][0] and gap == expected[i][2]
        np.testing.assert_array_equal(forces, expected[i][1])

    import copy
    import pickle

    for twin in (pickle.loads(pickle.dumps(calc)), copy.deepcopy(calc)):  # the lock is not copied
        assert twin._lock is not calc._lock
        assert twin.get_potential_energy(structures[0].copy()) == expected[0][0]
