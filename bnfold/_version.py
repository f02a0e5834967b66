"""The version of bnfold (one place; pyproject.toml reads it)."""

__version__ = "0.3.0"
