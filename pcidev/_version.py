"""The version of pcidev, defined here only: pyproject.toml reads it for the distribution."""

__version__ = "0.1.0"
