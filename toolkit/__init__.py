"""phikit: convert, validate, package and run Phi-3 / Phi-3.5 models on edge devices."""

__version__ = "0.1.0"
