"""ctypes loader of the optional CUDA library built from ``csrc/`` (none built yet)."""


def load_error() -> str:
    """'' when the CUDA library is loaded, else why it is not."""
    return "no CUDA library is built into this install (csrc/ has no kernels yet)"
