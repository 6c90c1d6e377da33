"""Triton kernels, installed as ``tinyrecon.kernels``: one module per family, named like the
torch reference it is tested against (``tinyrecon/functions/<family>.py``)."""
