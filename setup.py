"""Packaging: ``src/tinyrecon`` plus the top-level ``kernels/`` as ``tinyrecon.kernels``."""
from setuptools import setup

setup(
    packages=["tinyrecon", "tinyrecon.functions", "tinyrecon.kernels"],
    package_dir={"tinyrecon": "src/tinyrecon", "tinyrecon.kernels": "kernels"},
)
