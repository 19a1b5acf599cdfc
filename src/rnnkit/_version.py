"""The version, alone in a module that imports nothing (``rnnkit --version`` reads it without
loading torch; pyproject.toml reads it too)."""

__version__ = "0.1.0"
