"""`python -m lightning_modules ...` is the same as the `stagewise` console script."""

from lightning_modules.cli import main

main()
