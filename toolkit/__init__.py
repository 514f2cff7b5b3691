"""phikit: convert, validate, package and run Phi-3 / Phi-3.5 models on edge devices."""

__version__ = "0.1.0"

# runtimes imported anywhere in phikit (doctor's checks, converters' modules) send nothing
from .runner import core as _core  # noqa: E402,F401  (its import runs quiet_runtimes())
