"""Exceptions raised at the package boundary.

Each subclasses ``ValueError`` (``RunError``: ``RuntimeError``; or ``ImportError``) as well,
so that callers who catch the builtin type keep working, while callers who want to tell our
errors apart can.
"""


class CrystalformerError(Exception):
    """Base class of every error this package raises on purpose."""


class StructureError(CrystalformerError, ValueError):
    """A structure the model cannot take: bad cell, bad coordinates, unknown element."""


class CheckpointError(CrystalformerError, ValueError):
    """A checkpoint file that is missing, corrupted or incompatible with this version."""


class DataError(CrystalformerError, ValueError):
    """A dataset, split or target specification that cannot be used."""


class RunError(CrystalformerError, RuntimeError):
    """A run directory in use by another run, holding another run, or with nothing to resume."""


def missing_extra(package: str, extra: str) -> ImportError:
    """The error to raise when an optional dependency is not installed."""
    return ImportError(
        f"this feature needs {package!r}; install it with "
        f"`pip install 'ase-crystalformer[{extra}]'` or `pip install {package}`"
    )
