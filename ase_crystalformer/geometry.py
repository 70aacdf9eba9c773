"""The periodic window: every image of every atom pair inside a sphere, shared by all layers.

Crystalformer's attention sums, for a query atom i, over every periodic image n of every
atom j of the same crystal. We keep the images with |p_j + n·L - p_i| ≤ cutoff (self image
included), found once per structure with ``vesin`` (a compiled cell-list neighbour search,
~100× faster than ``ase.neighborlist`` here). Because the window is a sphere, the same
physical images are kept whatever unit cell describes the crystal, which makes the model
exactly invariant to supercells and basis changes; the box window of the original code only
approximately is.

Vocabulary of shapes: B crystals, N atoms (all crystals concatenated), M image slots per
atom (padded), P distinct (i, j) atom pairs that have at least one image in the window.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields

import numpy as np
import torch
import vesin
from ase import Atoms
from ase.geometry import minkowski_reduce

from .errors import StructureError
from .structures import MIN_DISTANCE, Label, check_atoms


@dataclass(frozen=True)
class Window:
    """One structure and its periodic window, as numpy arrays (cheap to cache and collate).

    Entries are sorted by ``center``; ``slot`` is each entry's position in its center's
    list. ``pair`` numbers the distinct (center, neighbor) pairs of this structure, whose
    atoms are ``pair_i``/``pair_j``.
    """

    numbers: np.ndarray  # (n,) int
    positions: np.ndarray  # (n, 3) Å
    cell: np.ndarray  # (3, 3) Å, rows are lattice vectors
    center: np.ndarray  # (T,) atom i
    neighbor: np.ndarray  # (T,) atom j
    shift: np.ndarray  # (T, 3) integer image n, so that r = p_j - p_i + n·L
    slot: np.ndarray  # (T,)
    pair: np.ndarray  # (T,)
    pair_i: np.ndarray  # (P,)
    pair_j: np.ndarray  # (P,)
    pbc: np.ndarray  # (3,) bool, periodic axes (reciprocal-space heads need all three)

    @property
    def n_atoms(self) -> int:
        return len(self.numbers)

    @property
    def n_images(self) -> int:
        return len(self.center)


def _complete_basis(cell: np.ndarray, pbc: np.ndarray, length: float = 1.0) -> np.ndarray:
    """The periodic rows of ``cell`` as given; vectors of ``length`` normal to them on the others.

    Non-periodic axes may carry zero or arbitrary vectors in ASE; wrapping and the neighbour
    search need a non-singular box whose open axes are orthogonal to the periodic ones (so
    the periodic fractional coordinates do not depend on the open ones). No shift is ever
    applied along such an axis, so the vectors we put there never reach the model.
    """
    if pbc.all():
        return cell
    cell = cell.copy()
    # The last rows of V in the SVD of the periodic rows span their orthogonal complement.
    cell[~pbc] = length * np.linalg.svd(cell[pbc])[2][pbc.sum():]
    return cell


#: Integer combinations whose lengths a 3-D Minkowski-reduced basis b1, b2, b3 bounds from
#: below (|b2|, |b3|, |b1 ± b2|, ...), in the order of ``ase.geometry.is_minkowski_reduced``.
_MINKOWSKI_COMBINATIONS = np.array([
    [0, 1, 0], [0, 0, 1], [1, 1, 0], [1, 0, 1], [0, 1, 1], [1, -1, 0],
    [1, 0, -1], [0, 1, -1], [1, 1, 1], [1, -1, 1], [1, 1, -1], [1, -1, -1],
])
_MINKOWSKI_BOUNDS = [0, 1, 1, 2, 2, 1, 2, 2, 2, 2, 2, 2]
#: Relative slack of the reduction test: lattices typed with a few decimals (CIFs, MP's
#: fcc/bcc primitive and 120° hexagonal bases) break ties such as |b1 - b2| = |b2| by
#: ~1e-10 of a length either way, and ase's absolute 1e-12 then sends half of such cells
#: through ``minkowski_reduce`` (a Python loop of ~0.5 ms) to trade one shortest vector for
#: another as short. The window needs no exact reduction, only small shifts n: the sphere of
#: images is the same in any basis.
_MINKOWSKI_SLACK = 1e-6


def _is_reduced(cell: np.ndarray) -> bool:
    """``ase.geometry.is_minkowski_reduced`` of a 3-D periodic cell, with ties up to a
    relative ``_MINKOWSKI_SLACK`` counted as reduced, and without ase's per-call overhead
    (a third of window building for small cells): where this says False, ase says False."""
    lhs = np.linalg.norm(_MINKOWSKI_COMBINATIONS @ cell, axis=1)
    rhs = np.linalg.norm(cell, axis=1)[_MINKOWSKI_BOUNDS]
    return bool((lhs >= rhs * (1 - _MINKOWSKI_SLACK)).all())


@functools.lru_cache(maxsize=256)
def _minkowski_reduced(cell: bytes, pbc: tuple[bool, ...]) -> np.ndarray:
    """``minkowski_reduce`` of a float64 cell given as bytes, remembered: a calculator
    driving MD, a relaxation at fixed cell or phonon displacements asks for one cell again
    and again, and the reduction is a Python loop of ~1 ms."""
    reduced = np.array(minkowski_reduce(np.frombuffer(cell).reshape(3, 3), np.array(pbc))[0], dtype=float)
    reduced.flags.writeable = False
    return reduced


def reduce_cell(atoms: Atoms, label: str | Label) -> tuple[np.ndarray, np.ndarray]:
    """Positions wrapped into a Minkowski-reduced cell of the same lattice, in float64.

    Returns (positions, cell). An atom unwrapped by many lattice vectors, or a valid but
    very skewed basis, would otherwise need huge image shifts n (and lose precision in
    p_j + n·L - p_i); after reduction every image in the window has |n| ≲ cutoff / (the
    shortest lattice vector) + 1. The model is exactly invariant to both changes, and the
    atoms keep their order, so forces per atom and the stress are those of the input. Only
    the periodic axes are reduced and wrapped (``ase.geometry.minkowski_reduce`` respects
    pbc). Already wrapped positions and reduced cells come back bit-identical.
    """
    pbc = np.asarray(atoms.pbc, dtype=bool)
    cell = np.array(atoms.cell, dtype=float)
    if not (pbc.all() and _is_reduced(cell)):
        try:
            cell = _minkowski_reduced(cell.tobytes(), tuple(pbc.tolist())).copy()
        except (RuntimeError, np.linalg.LinAlgError) as err:
            raise StructureError(f"{label}: the cell cannot be reduced ({err})") from err
    positions = np.array(atoms.positions, dtype=float)
    box = _complete_basis(cell, pbc)
    whole = np.floor(np.linalg.solve(box.T, positions.T).T)  # (n, 3) lattice vectors to remove
    whole[:, ~pbc] = 0.0
    return positions - whole @ box, cell


def _search_box(positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray, cutoff: float) -> np.ndarray:
    """The cell on periodic axes; vectors longer than the structure plus ``cutoff`` on the others."""
    return _complete_basis(cell, pbc, np.ptp(positions, axis=0).max() + cutoff + 1.0)


#: Storage type of image shifts; ``build_window`` refuses a window whose shifts it cannot hold.
SHIFT_DTYPE = np.int16


def build_window(atoms: Atoms, cutoff: float, label: str | Label | None = None) -> Window:
    """Check ``atoms`` and list every image within ``cutoff`` Å of every atom.

    The window is built on wrapped positions in a reduced cell (``reduce_cell``), which it
    records. Raises ``StructureError`` for the bad inputs of ``structures.check_atoms``, for
    atoms closer than 0.1 Å to another atom or to a periodic image of themselves, and for
    a window whose image shifts would not fit their storage type.
    """
    label = label if label is not None else Label(atoms)
    check_atoms(atoms, label)
    positions, cell = reduce_cell(atoms, label)
    pbc = np.asarray(atoms.pbc, dtype=bool)
    n = len(atoms)
    search = vesin.NeighborList(cutoff=cutoff, full_list=True)
    i, j, shift, dist = search.compute(positions, _search_box(positions, cell, pbc, cutoff), pbc, "ijSd")
    if dist.size and dist.min() < MIN_DISTANCE:
        k = int(np.argmin(dist))
        what = "its own periodic image" if i[k] == j[k] else f"atom {int(j[k])}"
        raise StructureError(
            f"{label}: atom {int(i[k])} is {dist[k]:.3g} Å from {what} "
            f"(overlapping atoms; minimum {MIN_DISTANCE} Å)"
        )
    largest = int(np.abs(shift).max()) if shift.size else 0
    if largest > np.iinfo(SHIFT_DTYPE).max:
        raise StructureError(
            f"{label}: a {cutoff} Å window needs images {largest} cells away, more than "
            f"{np.iinfo(SHIFT_DTYPE).max}; the cell is too thin for this cutoff"
        )
    # Add the self image (i, i, n = 0), which the neighbour search leaves out.
    atoms_idx = np.arange(n)
    center = np.concatenate([atoms_idx, i]).astype(np.int64)
    neighbor = np.concatenate([atoms_idx, j]).astype(np.int64)
    shift = np.concatenate([np.zeros((n, 3), dtype=np.int64), shift.astype(np.int64)])
    distance = np.concatenate([np.zeros(n), dist])
    # Each atom's images nearest first: a range of slots then spans few distances, which
    # lets the model store only the nonzero band of their radial bases (attention.BandedBasis);
    # the self image comes first. Ties (equal distances, common in supercells) go by
    # neighbour, then shift, so the order does not depend on the order vesin lists its
    # entries in. (neighbour, shift) is packed into one integer of the same lexicographic
    # order: np.lexsort makes a pass per key. No overflow: an atom at least MIN_DISTANCE from
    # its own images keeps |n| ≤ cutoff / MIN_DISTANCE.
    side = 2 * largest + 1
    tie = ((neighbor * side + shift[:, 0] + largest) * side + shift[:, 1] + largest) * side + shift[:, 2] + largest
    order = np.lexsort((tie, distance, center))
    center, neighbor, shift = center[order], neighbor[order], shift[order]
    counts = np.bincount(center, minlength=n)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    slot = np.arange(len(center)) - starts[center]
    # Pairs (i, j) numbered in the order of their keys i·n + j: by a table over all n²
    # keys for cells of up to a few thousand atoms (no sort), else by np.unique.
    pair_key = center * n + neighbor
    if n * n <= 8 * len(pair_key) + 4096:
        present = np.zeros(n * n, dtype=bool)
        present[pair_key] = True
        keys = np.flatnonzero(present)
        pair = (np.cumsum(present) - 1)[pair_key]
    else:
        keys, pair = np.unique(pair_key, return_inverse=True)
    return Window(
        numbers=np.asarray(atoms.numbers, dtype=np.int64),
        positions=positions,
        cell=cell,
        # Compact dtypes: a training set's cached windows are ~1 GB otherwise.
        center=center.astype(np.int32),
        neighbor=neighbor.astype(np.int32),
        shift=shift.astype(SHIFT_DTYPE),
        slot=slot.astype(np.int32),
        pair=pair.reshape(-1).astype(np.int32),
        pair_i=(keys // n).astype(np.int32),
        pair_j=(keys % n).astype(np.int32),
        pbc=np.array(atoms.pbc, dtype=bool),
    )


@dataclass
class Batch:
    """Several windows concatenated into the tensors the model consumes.

    Image lists are padded per atom to the longest one (M); padded slots have
    ``mask == False``, point at the atom itself with shift 0 and never receive weight.
    """

    numbers: torch.Tensor  # (N,) long
    positions: torch.Tensor  # (N, 3)
    cells: torch.Tensor  # (B, 3, 3)
    crystal: torch.Tensor  # (N,) long, crystal of each atom
    n_atoms: torch.Tensor  # (B,) long
    neighbor: torch.Tensor  # (N, M) long, atom j of each image slot
    shift: torch.Tensor  # (N, M, 3) float, integer-valued image n
    mask: torch.Tensor  # (N, M) bool
    pair: torch.Tensor  # (N, M) long, index into pair_i/pair_j
    pair_i: torch.Tensor  # (P,) long
    pair_j: torch.Tensor  # (P,) long
    pbc: torch.Tensor  # (B, 3) bool

    @property
    def n_crystals(self) -> int:
        return len(self.n_atoms)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Batch:
        """Move to ``device``; cast the floating tensors to ``dtype``."""
        moved = {}
        for f in fields(self):
            t = getattr(self, f.name)
            moved[f.name] = t.to(device, dtype) if t.is_floating_point() else t.to(device)
        return Batch(**moved)


_NUMPY_FLOAT = {torch.float32: np.float32, torch.float64: np.float64}


def collate(windows: Sequence[Window], dtype: torch.dtype = torch.float32) -> Batch:
    """Concatenate windows into one padded ``Batch`` (vectorised; no per-image Python)."""
    n_atoms = np.array([w.n_atoms for w in windows])
    atom_offset = np.concatenate([[0], np.cumsum(n_atoms)[:-1]])
    n_pairs = np.array([len(w.pair_i) for w in windows])
    pair_offset = np.concatenate([[0], np.cumsum(n_pairs)[:-1]])
    n_total = int(n_atoms.sum())

    def stack(name: str, offsets: np.ndarray) -> np.ndarray:
        return np.concatenate([getattr(w, name).astype(np.int64) + o for w, o in zip(windows, offsets)])

    center = stack("center", atom_offset)
    neighbor = stack("neighbor", atom_offset)
    pair = stack("pair", pair_offset)
    slot = np.concatenate([w.slot for w in windows]).astype(np.int64)
    shift = np.concatenate([w.shift for w in windows])
    first_pair = pair[slot == 0]  # (N,) a pair of each atom, to fill its padded slots
    width = int(slot.max()) + 1

    pad_neighbor = np.repeat(np.arange(n_total)[:, None], width, axis=1)
    pad_pair = np.repeat(first_pair[:, None], width, axis=1)
    # Shifts are small integers, exact in any float type: made in the batch's type at once.
    pad_shift = np.zeros((n_total, width, 3), dtype=_NUMPY_FLOAT.get(dtype, np.float64))
    mask = np.zeros((n_total, width), dtype=bool)
    flat = center * width + slot  # one flat index for the four scatters
    pad_neighbor.reshape(-1)[flat] = neighbor
    pad_pair.reshape(-1)[flat] = pair
    pad_shift.reshape(-1, 3)[flat] = shift
    mask.reshape(-1)[flat] = True

    return Batch(
        numbers=torch.from_numpy(np.concatenate([w.numbers for w in windows])),
        positions=torch.from_numpy(np.concatenate([w.positions for w in windows])).to(dtype),
        cells=torch.from_numpy(np.stack([w.cell for w in windows])).to(dtype),
        crystal=torch.from_numpy(np.repeat(np.arange(len(windows)), n_atoms)),
        n_atoms=torch.from_numpy(n_atoms.astype(np.int64)),
        neighbor=torch.from_numpy(pad_neighbor),
        shift=torch.from_numpy(pad_shift).to(dtype),
        mask=torch.from_numpy(mask),
        pair=torch.from_numpy(pad_pair),
        pair_i=torch.from_numpy(stack("pair_i", atom_offset)),
        pair_j=torch.from_numpy(stack("pair_j", atom_offset)),
        pbc=torch.from_numpy(np.stack([w.pbc for w in windows])),
    )


def image_vectors(batch: Batch) -> torch.Tensor:
    """r = p_j + n·L - p_i for every image slot, differentiable in positions and cells.

    Returns (N, M, 3). Computed directly, not as |r|² + 2r·t + |t|², to avoid cancellation.
    """
    n, m = batch.neighbor.shape
    translation = torch.bmm(batch.shift, batch.cells.index_select(0, batch.crystal))  # (N, M, 3)
    # index_select of a flat index rather than positions[neighbor]: the same values, and
    # about a third less time, forward and backward, on a batch of 128 MP structures.
    neighbors = batch.positions.index_select(0, batch.neighbor.reshape(-1)).view(n, m, 3)
    return neighbors - batch.positions[:, None, :] + translation


def windows_for(atoms_list: Sequence[Atoms], cutoff: float, threads: int | None = None) -> list[Window]:
    """``build_window`` for each structure, labelled by its index in the input, in order.

    Runs on ``threads`` threads (default ``torch.get_num_threads()``, the share of the
    machine the caller gave torch): the model waits for its batch's windows, so its
    threads are idle meanwhile, and the neighbour search and numpy's sorts release the GIL
    (~1.3× on 2 threads, docs/benchmarks.md). The first bad structure in input order raises.
    """
    threads = torch.get_num_threads() if threads is None else threads
    labelled = [(atoms, Label(atoms, index)) for index, atoms in enumerate(atoms_list)]
    if threads <= 1 or len(labelled) < 2:
        return [build_window(atoms, cutoff, label) for atoms, label in labelled]
    with ThreadPoolExecutor(min(threads, len(labelled))) as pool:
        return list(pool.map(lambda item: build_window(item[0], cutoff, item[1]), labelled))

