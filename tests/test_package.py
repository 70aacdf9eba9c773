"""Package metadata: the version attribute and the PEP 561 marker that type checkers read."""

import tomllib
from importlib.metadata import version
from pathlib import Path

import ase_crystalformer


def test_version_is_the_installed_distributions() -> None:
    assert ase_crystalformer.__version__ == version("ase-crystalformer")
    assert "__version__" in ase_crystalformer.__all__


def test_py_typed_marker_ships_as_package_data() -> None:
    package = Path(ase_crystalformer.__file__).parent
    assert (package / "py.typed").is_file()
    pyproject = tomllib.loads((package.parent / "pyproject.toml").read_text())
    assert "py.typed" in pyproject["tool"]["setuptools"]["package-data"]["ase_crystalformer"]
