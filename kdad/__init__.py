"""kdad: knowledge-distillation anomaly detection (README.md; the variants: kdad/models/README.md)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("kdad")
except PackageNotFoundError:  # a checkout on sys.path without installing
    __version__ = "0+unknown"

__all__ = ["__version__"]
