"""Package metadata: the version attribute, the PEP 561 marker that type checkers read, and
user-facing text that cites only what users have."""

import re
import tomllib
from importlib.metadata import version
from pathlib import Path

import ase_crystalformer
from click.testing import CliRunner

from ase_crystalformer.cli import main


def test_version_is_the_installed_distributions() -> None:
    assert ase_crystalformer.__version__ == version("ase-crystalformer")
    assert "__version__" in ase_crystalformer.__all__


def test_py_typed_marker_ships_as_package_data() -> None:
    package = Path(ase_crystalformer.__file__).parent
    assert (package / "py.typed").is_file()
    pyproject = tomllib.loads((package.parent / "pyproject.toml").read_text())
    assert "py.typed" in pyproject["tool"]["setuptools"]["package-data"]["ase_crystalformer"]


def test_docstrings_and_help_cite_no_spec_section() -> None:
    """Users have the paper, not our internal specification: no "spec §" in the package's
    source (docstrings, comments, messages) or in any command's --help."""
    package = Path(ase_crystalformer.__file__).parent
    cited = [f"{p.relative_to(package)}:{i}" for p in sorted(package.rglob("*.py"))
             for i, line in enumerate(p.read_text().splitlines(), 1) if re.search(r"spec\s*§", line)]
    assert cited == []
    for command in [None, *main.commands]:
        result = CliRunner().invoke(main, [command, "--help"] if command else ["--help"])
        assert result.exit_code == 0, result.output
        assert "§" not in result.output, command
