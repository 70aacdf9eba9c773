"""matminer featurizer: Crystalformer embeddings and predictions as DataFrame columns.

matminer's ``featurize_many`` forks a process pool and featurizes one entry at a time, which
is the wrong shape for a torch model (every worker would load the model and run batch size
1). This featurizer pins ``n_jobs`` to 1 and batches on the model's device instead, while
keeping matminer's ``ignore_errors``/``return_errors`` behaviour entry by entry.

What is batched when:

* this featurizer's own ``featurize_many``, ``featurize_dataframe``, ``transform`` and
  ``fit_featurize_dataframe``: batched.
* ``MultipleFeaturizer`` with ``iterate_over_entries=True`` (its default) does not call its
  members' ``featurize_many``: it forks its own pool (``n_jobs`` = all cores) and calls each
  member's ``featurize`` once per entry in the workers, and the entries reach no member
  before that. So ``featurize_dataframe`` alone runs the model per entry in matminer's
  pool. ``fit_featurize_dataframe``, or ``fit`` then ``featurize_dataframe``, is batched:
  ``MultipleFeaturizer.fit`` calls this featurizer's ``fit``, which computes the features
  of all entries in batches and keeps them (``features_``); the workers, forked later,
  inherit them and run no model for a kept structure.
* ``MultipleFeaturizer(..., iterate_over_entries=False)`` calls each member's
  ``featurize_many``: batched, with or without ``fit``.

Kept features stay in this process and the processes it forks: pickling the featurizer
carries only a token for them, because matminer's pool pickles the featurizer again with
every chunk of 10 entries (the features themselves would cost time quadratic in the number
of entries). Where workers are not forked (the spawn or forkserver start methods: Windows,
macOS, Linux from Python 3.14) they find nothing kept and compute per entry: the same
values, unbatched.

A forked child of a process whose torch already ran OpenMP threads hangs at its first
parallel region, so in a forked process this featurizer runs torch on one thread (as
torch's own DataLoader workers do); the pool supplies the parallelism.
"""

from __future__ import annotations

import hashlib
import logging
import os
import traceback
import uuid
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch

from . import inference
from .domain import warn_outside
from .errors import missing_extra
from .geometry import build_window, collate
from .committee import Committee
from .inference import (
    CRYSTALFORMER_BIBTEX,
    Model,
    ModelSpec,
    eval_mode,
    load_models,
    resolve_device,
    std_property,
    target_properties,
)
from .model import Crystalformer
from .structures import Label, check_atoms, describe, to_atoms

try:
    from matminer.featurizers.base import BaseFeaturizer
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise missing_extra("matminer", "matminer") from err

logger = logging.getLogger(__name__)

_forked = False  # set in a child made by os.fork (matminer's process pools)


def _mark_forked() -> None:
    global _forked
    _forked = True


if hasattr(os, "register_at_fork"):  # POSIX; Windows has no fork
    os.register_at_fork(after_in_child=_mark_forked)

Mode = Literal["embedding", "predictions", "both"]
_SETTINGS = ("model", "mode", "device", "pooling")  # what the features depend on (batch_size does not)
#: Statistics over a crystal's atoms that the embedding can keep; "mean" is the vector the
#: prediction head reads.
POOLINGS = ("mean", "max", "min", "std")
#: The default pooling: every statistic (the mean alone loses how the atoms differ).
DEFAULT_POOLING = POOLINGS
_SKIP_HINT = (
    "\nTO SKIP THESE ERRORS when featurizing specific compounds, set 'ignore_errors=True' "
    "when running the batch featurize() operation (e.g., featurize_many(), "
    "featurize_dataframe(), etc.)."
)


@dataclass(frozen=True, eq=False)
class KeptFeatures:
    """Features computed by ``CrystalformerFeaturizer.fit``, by structure fingerprint."""

    rows: dict[bytes, int]  # fingerprint -> row of values
    values: np.ndarray  # (kept structures, features), float64
    token: str = field(default_factory=lambda: uuid.uuid4().hex)

    def get(self, key: bytes) -> list[float] | None:
        row = self.rows.get(key)
        return None if row is None else self.values[row].tolist()


# token -> kept features, for featurizers unpickled in a forked worker (module docstring)
_KEPT: weakref.WeakValueDictionary[str, KeptFeatures] = weakref.WeakValueDictionary()


class CrystalformerFeaturizer(BaseFeaturizer):
    """Learned Crystalformer representation of a crystal structure.

    Input: a pymatgen ``Structure`` or an ``ase.Atoms`` (ordered, at least one periodic
    axis). ``model`` is a shipped model name, a checkpoint path or a ``Crystalformer``
    (``None``: the shipped backbone, ``multitask-backbone``, trained on every labelled set we
    have, ``inference.embedding_model``; for mode "embedding" only, since its heads are less
    accurate than the property models fine-tuned from it); it is loaded on first use.

    Features:
        crystalformer emb <k>: component k of the mean over atoms of the atom features
            after the last attention block (the vector the prediction head reads), for mode
            "embedding" or "both" with "mean" in ``pooling``. Unitless;
            d = ``model.config.d_model`` columns.
        crystalformer emb <stat> <k>: the same atom features' max, min or std (population,
            over the crystal's atoms; 0 for one atom) when ``pooling`` names them. The
            default, ``("mean", "max", "min", "std")``, gives 4·d columns that keep how the
            atoms differ, which the mean alone averages away (``pooling="mean"``: d columns,
            the head's input; measured against it in docs/results.md).
        crystalformer <property>: the model's prediction of each of its targets, named as
            by the ASE calculator (e.g. ``formation_energy_per_atom`` in eV/atom,
            ``band_gap`` in eV, ``bulk_modulus_vrh`` in GPa; see
            ``inference.TARGET_ALIASES``), for mode "predictions" or "both".
        crystalformer <property>_std: for a committee (``committee.Committee``), its
            members' sample std (ddof=1) of that prediction, in the target's training space
            (log10 units for a log10 target), after each prediction column.

    With a committee, the embedding is its first member's.

    The embedding is a fixed transfer-learning feature: its quality for a property the
    model was not trained on is an empirical question (``examples/featurize_and_fit.py``).

    ``featurize_many``/``featurize_dataframe`` batch. ``fit(X)`` computes the features of
    all of ``X`` in batches and keeps them in ``features_``; afterwards any call returns the
    kept features of a structure with the same atomic numbers, positions, cell and pbc
    without running the model. That is what batches ``MultipleFeaturizer``'s
    ``fit_featurize_dataframe`` (or ``fit`` then ``featurize_dataframe``), whose pool calls
    ``featurize`` once per entry; its ``featurize_dataframe`` without ``fit`` runs the model
    per entry in the pool, unless ``iterate_over_entries=False``. Entries that fail are not
    kept, so they fail as they would without ``fit``. Assigning ``model``, ``mode`` or
    ``device`` (``set_params``) drops the kept features; so refit after changing a model's
    weights in place.
    """

    def __init__(
        self,
        model: ModelSpec | None = None,
        mode: Mode = "embedding",
        device: str = "auto",
        batch_size: int = 64,
        pooling: Sequence[str] = DEFAULT_POOLING,
    ) -> None:
        if mode not in ("embedding", "predictions", "both"):
            raise ValueError(f"mode={mode!r}; use 'embedding', 'predictions' or 'both'")
        pooling = (pooling,) if isinstance(pooling, str) else tuple(pooling)
        if not pooling or any(p not in POOLINGS for p in pooling) or len(set(pooling)) != len(pooling):
            raise ValueError(f"pooling={pooling!r}; use distinct names from {POOLINGS}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model
        self.mode = mode
        self.device = device
        self.batch_size = batch_size
        self.pooling = pooling
        self._loaded: tuple[Any, Any, Model] | None = None

    # -------------------------------------------------------------------- model handling
    def _get_model(self) -> Model:
        """The model for the current ``model``/``device`` settings (reloaded if they change)."""
        if _forked and torch.get_num_threads() > 1:
            torch.set_num_threads(1)  # the OpenMP pool did not survive the fork (module docstring)
        if self.model is None and self.mode != "embedding":  # the default is for embeddings only
            raise ValueError(
                f"mode={self.mode!r} needs a model: the default one (the backbone, whose heads are "
                f"a by-product) is for embeddings; name a property model, e.g. one of {inference.property_models()}"
            )
        if self._loaded is None or self._loaded[0] is not self.model or self._loaded[1] != self.device:
            device = resolve_device(self.device)
            dtype = self.model.dtype if isinstance(self.model, (Crystalformer, Committee)) else torch.float32
            spec = self.model if self.model is not None else inference.embedding_model()
            label, model = load_models(spec, device, dtype)[0]
            logger.info("CrystalformerFeaturizer: model %s on %s", label, device)
            self._loaded = (self.model, self.device, model)
        return self._loaded[2]

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _SETTINGS:  # set_params assigns: the kept features are for the old settings
            self.__dict__.pop("features_", None)
        super().__setattr__(name, value)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(super().__getstate__())  # keeps sklearn's version stamp
        state["_loaded"] = None  # reload in the receiving process instead of pickling weights
        if "features_" in state:  # a token, not the features (module docstring)
            state["features_"] = state["features_"].token
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        token = state.pop("features_", None)
        super().__setstate__(state)
        kept = _KEPT.get(token) if token is not None else None
        if kept is not None:  # in this process or one forked from it
            self.__dict__["features_"] = kept

    # ------------------------------------------------------------------ matminer contract
    def set_n_jobs(self, n_jobs: int) -> None:
        """Ignored: the model batches on its device; a process pool would copy it per job."""
        if n_jobs != 1:
            logger.info("CrystalformerFeaturizer runs in one process (n_jobs=%s ignored)", n_jobs)
        self._n_jobs = 1

    @property
    def n_jobs(self) -> int:
        return 1

    def precheck(self, x: Any) -> bool:
        """True if ``x`` converts to atoms and passes ``structures.check_atoms`` (cheap)."""
        try:
            atoms = to_atoms(x)
            check_atoms(atoms, describe(atoms))
        except (TypeError, ValueError):
            return False
        return True

    def fit(
        self, X: Any, y: Any = None, pbar: bool | dict[str, Any] = True, **fit_kwargs: Any
    ) -> CrystalformerFeaturizer:
        """Compute the features of all entries of ``X`` in batches and keep them (``features_``).

        ``X`` takes the forms ``featurize_many`` takes; ``y`` is ignored. Entries that fail
        are not kept (they fail again, unchanged, when featurized); other errors (the model
        cannot be loaded) raise here.
        """
        self.__dict__.pop("features_", None)  # refit from scratch, not from the old ones
        rows = _rows(X)
        values = self._featurize_rows(rows, ignore_errors=True, return_errors=True, pbar=pbar)
        keys: dict[bytes, int] = {}
        kept: list[list[float]] = []
        for row, features in zip(rows, values):
            key = None if isinstance(features[-1], str) else _fingerprint(row)
            if key is not None and key not in keys:
                keys[key] = len(kept)
                kept.append(features[:-1])
        shape = (len(kept), len(self.feature_labels()))
        self.features_ = KeptFeatures(keys, np.array(kept, dtype=np.float64).reshape(shape))
        _KEPT[self.features_.token] = self.features_
        return self

    def featurize(self, x: Any) -> list[float]:
        """Features of one structure; raises the structure's own error if it cannot be taken.

        A structure kept by ``fit`` is answered without loading or running the model.
        """
        kept = self._kept((x,))
        if kept is not None:
            return kept
        return self._featurize_rows([(x,)], ignore_errors=False, return_errors=False, hint=False)[0]

    def feature_labels(self) -> list[str]:
        model = self._get_model()
        labels: list[str] = []
        if self.mode in ("embedding", "both"):
            for stat in self.pooling:
                prefix = "crystalformer emb" if stat == "mean" else f"crystalformer emb {stat}"
                labels += [f"{prefix} {k}" for k in range(model.config.d_model)]
        if self.mode in ("predictions", "both"):
            for t in target_properties([("model", model)]):
                labels.append(f"crystalformer {t.name}")
                if isinstance(model, Committee):
                    labels.append(f"crystalformer {std_property(t)[0]}")
        return labels

    def citations(self) -> list[str]:
        return [CRYSTALFORMER_BIBTEX]

    def implementors(self) -> list[str]:
        return ["ase-crystalformer contributors"]

    def featurize_many(
        self,
        entries: Any,
        ignore_errors: bool = False,
        return_errors: bool = False,
        pbar: bool | dict[str, Any] = True,
    ) -> list[list[Any]]:
        """matminer's ``featurize_many``, batched: same inputs, outputs and error handling.

        Each entry that fails (conversion, checks, neighbour search) gives NaN features
        with ``ignore_errors``, plus its traceback text with ``return_errors``; without
        ``ignore_errors`` the first failing entry raises, its message extended with
        matminer's hint.
        """
        if return_errors and not ignore_errors:
            raise ValueError("Please set ignore_errors to True to use return_errors.")
        rows = _rows(entries)
        if not rows:
            return []
        return self._featurize_rows(rows, ignore_errors, return_errors, pbar)

    # ------------------------------------------------------------------------- internals
    def _featurize_rows(
        self,
        rows: Sequence[tuple[Any, ...]],
        ignore_errors: bool,
        return_errors: bool,
        pbar: bool | dict[str, Any] = False,
        hint: bool = True,
    ) -> list[list[Any]]:
        """Features of each row, in order; failures handled as in matminer's wrapper.

        Unlike matminer (which catches ``BaseException``), only ``Exception`` is treated as
        a failed entry, so Ctrl-C still stops a long run. Structures kept by ``fit`` are
        not recomputed (nor checked against the model's domain again: ``fit`` did that).
        """
        out, seen = self.featurize_part(rows, 0, ignore_errors, return_errors, pbar, hint)
        self.warn_outside(seen, len(rows))
        return out

    def warn_outside(self, seen: Sequence[tuple[int, np.ndarray]], n_rows: int) -> None:
        """``domain.warn_outside`` for the (index, atomic numbers) of the featurized rows."""
        model = self._get_model()
        warn_outside(model.metadata.get("name", "model"), model.metadata.get("domain"), seen, n_rows)

    def featurize_part(
        self,
        rows: Sequence[tuple[Any, ...]],
        first: int,
        ignore_errors: bool,
        return_errors: bool,
        pbar: bool | dict[str, Any] = False,
        hint: bool = True,
    ) -> tuple[list[list[Any]], list[tuple[int, np.ndarray]]]:
        """``_featurize_rows`` of rows ``first``, ``first + 1``, ... of a longer input (errors
        name those numbers), without the domain warning: the features and the (index, atomic
        numbers) that ``warn_outside`` needs, so that parts featurized in worker processes
        warn once, as the whole input would."""
        model = self._get_model()
        n_labels = len(self.feature_labels())
        out: list[list[Any]] = [[] for _ in rows]

        def fail(index: int, err: Exception) -> None:
            if not ignore_errors:
                if hint:
                    _reraise(err)
                raise err
            features: list[Any] = [float("nan")] * n_labels
            if return_errors:
                features.append("".join(traceback.format_exception(type(err), err, err.__traceback__)))
            out[index] = features

        def run(indices: list[int], windows: list[Any]) -> None:
            try:
                values = self._run(model, windows)
            except Exception as err:
                if len(windows) == 1:
                    fail(indices[0], err)
                    return
                for index, window in zip(indices, windows):
                    run([index], [window])
                return
            for index, row in zip(indices, values):
                out[index] = row + [float("nan")] if return_errors else row

        seen: list[tuple[int, np.ndarray]] = []  # (index, atomic numbers), for the domain check
        progress = _progress(pbar, len(rows), type(self).__name__)
        try:
            for start in range(0, len(rows), self.batch_size):
                chunk = range(start, min(start + self.batch_size, len(rows)))
                indices, windows = [], []
                for index in chunk:
                    kept = self._kept(rows[index])
                    if kept is not None:
                        out[index] = kept + [float("nan")] if return_errors else kept
                        continue
                    try:
                        windows.append(self._window(rows[index], model, first + index))
                    except Exception as err:
                        fail(index, err)
                    else:
                        indices.append(index)
                        seen.append((first + index, windows[-1].numbers))
                if windows:
                    run(indices, windows)
                if progress is not None:
                    progress.update(len(chunk))
        finally:
            if progress is not None:
                progress.close()
        return out, seen

    def _kept(self, row: tuple[Any, ...]) -> list[float] | None:
        """The features ``fit`` kept for this entry's structure, or None."""
        kept: KeptFeatures | None = self.__dict__.get("features_")
        if kept is None:
            return None
        key = _fingerprint(row)
        return None if key is None else kept.get(key)

    def _window(self, row: tuple[Any, ...], model: Crystalformer, index: int) -> Any:
        if len(row) != 1:
            raise TypeError(f"featurize takes one structure per entry, got {len(row)} values")
        atoms = to_atoms(row[0])
        return build_window(atoms, model.config.cutoff, Label(atoms, index))

    def _run(self, model: Model, windows: list[Any]) -> list[list[float]]:
        batch = collate(windows, model.dtype).to(model.device)
        with eval_mode([model]), torch.no_grad():
            network = model.members[0] if isinstance(model, Committee) else model
            atoms = network.atom_features(batch)  # (N, d)
            pooled = pool_atoms(atoms, batch.crystal, batch.n_crystals, self.pooling)
            parts = []
            if self.mode in ("embedding", "both"):
                parts += pooled
            if self.mode in ("predictions", "both"):
                if isinstance(model, Committee):  # mean and std interleaved, per target
                    mean, std = model.mean_std(batch)
                    out = model.targets((mean - model.target_mean) / model.target_std)
                    parts.append(torch.stack([out, std], dim=2).flatten(1))  # (B, 2T)
                else:
                    parts.append(model.targets(model.readout(atoms, batch)[0]))  # (B, T)
            values = torch.cat(parts, dim=1).to("cpu", torch.float64).numpy()
        return [row.tolist() for row in values]


def _rows(entries: Any) -> list[tuple[Any, ...]]:
    """matminer's entry forms (list-like of inputs or of input tuples, or a DataFrame) as tuples."""
    if not isinstance(entries, (tuple, list, np.ndarray, pd.Series, pd.DataFrame)):
        raise TypeError("'entries' must be a list-like object")
    if len(entries) == 0:
        return []
    if isinstance(entries, pd.DataFrame):
        return [tuple(r) for r in entries.values]
    if isinstance(entries, pd.Series) or not isinstance(entries[0], (tuple, list, np.ndarray)):
        return [(e,) for e in entries]
    return [tuple(e) for e in entries]


def _fingerprint(row: tuple[Any, ...]) -> bytes | None:
    """SHA-256 of an entry's atomic numbers, positions, cell and pbc; None if it fails the checks.

    After ``check_atoms`` (which also reads the occupancies), those arrays are all the
    window and the model read, so equal fingerprints mean equal features. An entry that
    fails gets None and takes the normal path, which raises its own error.
    """
    if len(row) != 1:
        return None
    try:
        atoms = to_atoms(row[0])
        check_atoms(atoms, "structure")
    except Exception:
        return None
    digest = hashlib.sha256()
    for part in (atoms.numbers.astype(np.int64), atoms.positions.astype(np.float64),
                 np.asarray(atoms.cell, dtype=np.float64), np.asarray(atoms.pbc, dtype=bool)):
        digest.update(np.ascontiguousarray(part).tobytes())
    return digest.digest()


def pool_atoms(x: torch.Tensor, crystal: torch.Tensor, n_crystals: int, stats: Sequence[str]) -> list[torch.Tensor]:
    """Per-crystal statistics (each (B, d)) of atom features ``x`` (N, d), atoms assigned
    to crystals by ``crystal`` (N,): mean, max, min, population std, in ``stats`` order."""
    index = crystal[:, None].expand_as(x)
    counts = torch.zeros(n_crystals, 1, dtype=x.dtype, device=x.device).index_add_(
        0, crystal, torch.ones_like(x[:, :1]))
    mean = x.new_zeros(n_crystals, x.shape[1]).index_add_(0, crystal, x) / counts
    out = []
    for stat in stats:
        if stat == "mean":
            out.append(mean)
        elif stat in ("max", "min"):
            fill = x.new_full((n_crystals, x.shape[1]), -torch.inf if stat == "max" else torch.inf)
            out.append(fill.scatter_reduce(0, index, x, reduce="amax" if stat == "max" else "amin"))
        else:
            squares = x.new_zeros(n_crystals, x.shape[1]).index_add_(0, crystal, (x - mean[crystal]) ** 2)
            out.append((squares / counts).sqrt())
    return out


def _reraise(err: BaseException) -> None:
    """Raise ``err`` with matminer's hint, keeping its type as ``featurize_wrapper`` does.

    matminer rebuilds ``type(err)(message)``, which fails for exception types whose
    constructor takes other arguments; those are re-raised as they are, with the hint as a
    note.
    """
    message = str(err) + _SKIP_HINT
    try:
        new = type(err)(message)
    except Exception:
        err.add_note(_SKIP_HINT.strip())
        raise err from None
    raise new.with_traceback(err.__traceback__) from err


def _progress(pbar: bool | dict[str, Any], total: int, desc: str) -> Any:
    if not pbar:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, **(pbar if isinstance(pbar, dict) else {}))
