"""medray: LoRA fine-tuning of LLMs for medical reasoning on Ray (Ray Train, Ray Data, Ray Tune; Unsloth on CUDA).

The command is `medray` (medray.cli); the modules and their contracts are described in docs/architecture.md.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("medray")
except PackageNotFoundError:  # a source checkout on PYTHONPATH, not installed
    __version__ = "0.0.0+unknown"
