"""Shared helpers of the benchmark scripts: data, timing, memory, isolated runs, tables.

Scripts import this as ``_common`` (``python benchmarks/<script>.py`` puts this folder on
``sys.path``). Nothing here asserts a time: the scripts print tables, people judge them.
"""

from __future__ import annotations

import ast
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ase import Atoms


def default_data() -> str:
    """``$CRYSTALFORMER_DATA_DIR/mp_2015/flla_2015.csv`` (the MP 2015 formation energies)."""
    root = os.environ.get("CRYSTALFORMER_DATA_DIR", "data")
    return str(Path(root) / "mp_2015" / "flla_2015.csv")


def load_structures(path: str, n: int, seed: int = 0) -> tuple[list[Atoms], np.ndarray]:
    """``n`` structures drawn at random (fixed seed) and their formation energies (eV/atom).

    The CSV's ``structure`` column is a Python-literal dict of a pymatgen Structure; a
    leading ``# ref: ...`` line is skipped.
    """
    import pandas as pd
    from pymatgen.core import Structure
    from pymatgen.io.ase import AseAtomsAdaptor

    if not Path(path).is_file():
        raise SystemExit(f"data file not found: {path} (pass --data or set CRYSTALFORMER_DATA_DIR)")
    with open(path, encoding="utf-8") as f:
        skip = 1 if f.readline().startswith("#") else 0
    frame = pd.read_csv(path, skiprows=skip)
    frame = frame.sample(n=min(n, len(frame)), random_state=seed)
    atoms = [
        AseAtomsAdaptor.get_atoms(Structure.from_dict(ast.literal_eval(s))) for s in frame["structure"]
    ]
    return atoms, frame["formation_energy_per_atom"].to_numpy(dtype=float)


def load_first(path: str, n: int) -> tuple[list[Atoms], np.ndarray]:
    """The first ``n`` structures of the CSV and their formation energies (eV/atom)."""
    import pandas as pd
    from pymatgen.core import Structure
    from pymatgen.io.ase import AseAtomsAdaptor

    if not Path(path).is_file():
        raise SystemExit(f"data file not found: {path} (pass --data or set CRYSTALFORMER_DATA_DIR)")
    with open(path, encoding="utf-8") as f:
        skip = 1 if f.readline().startswith("#") else 0
    frame = pd.read_csv(path, skiprows=skip, nrows=n)
    atoms = [
        AseAtomsAdaptor.get_atoms(Structure.from_dict(ast.literal_eval(s))) for s in frame["structure"]
    ]
    return atoms, frame["formation_energy_per_atom"].to_numpy(dtype=float)


def seconds(fn: Callable[[], Any], sync: Callable[[], None] | None = None) -> float:
    """Wall time of one call (after ``sync``, for asynchronous devices)."""
    if sync:
        sync()
    start = time.perf_counter()
    fn()
    if sync:
        sync()
    return time.perf_counter() - start


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def rss_mb() -> float:
    """Current resident set size of this process (MiB)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (MiB; Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_isolated(script: str, args: Sequence[str]) -> dict[str, Any]:
    """Run ``script --worker ...`` in a fresh interpreter and return its JSON result.

    A fresh process per measurement makes its peak RSS that measurement's alone.
    """
    cmd = [sys.executable, script, *args]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"worker failed ({proc.returncode}): {' '.join(cmd)}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(threads: int = 0) -> str:
    """One line: CPU, torch build and threads (the workers' ``threads`` if set), GPU if any,
    load at start (shared machines)."""
    threads = threads or torch.get_num_threads()
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (
        f"{cpu_name()}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__} ({threads} threads), {gpu}, "
        f"load average {load:.1f} at start"
    )


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A markdown table; floats get 3 significant digits."""

    def fmt(x: Any) -> str:
        if isinstance(x, float):
            if math.isnan(x):
                return "–"
            return f"{x:.3g}" if abs(x) < 1e4 else f"{x:,.0f}"
        return str(x)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)
