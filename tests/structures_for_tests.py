"""Seeded generators of small random crystals shared by the tests."""

from __future__ import annotations

import numpy as np
from ase import Atoms


def random_cell(rng: np.random.Generator, scale: float = 3.5) -> np.ndarray:
    """A skewed triclinic cell with rows as lattice vectors (Å)."""
    while True:
        cell = np.eye(3) * scale + rng.uniform(-0.35, 0.35, (3, 3)) * scale
        volume = abs(np.linalg.det(cell))
        if volume > 0.4 * scale**3:
            return cell


def random_crystal(rng: np.random.Generator, n_atoms: int = 3, scale: float = 3.5, min_dist: float = 1.2) -> Atoms:
    """Random atoms in a random cell, no two closer than ``min_dist`` (with images)."""
    cell = random_cell(rng, scale)
    numbers = rng.integers(1, 40, n_atoms)
    while True:
        frac = rng.uniform(0, 1, (n_atoms, 3))
        atoms = Atoms(numbers=numbers, scaled_positions=frac, cell=cell, pbc=True)
        d = atoms.get_all_distances(mic=True) + np.eye(n_atoms) * 1e3
        if d.min() > min_dist:
            return atoms
