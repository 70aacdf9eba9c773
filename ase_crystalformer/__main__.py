"""``python -m ase_crystalformer`` runs the ``crystalformer`` command line."""

from .cli import main

main()
