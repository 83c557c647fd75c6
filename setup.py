"""The wheel's packages: ``worker`` and, as package data, the contract files in ``schemas/``.

``schemas/`` stays at the top of the checkout (README, AsyncAPI and tests name it there) and is
installed as ``worker.contract.schema_files``, so ``pabx-worker schemas check`` works from a
wheel. Everything else about the project is in ``pyproject.toml``.
"""

from setuptools import find_namespace_packages, find_packages, setup

SCHEMA_FILES = "worker.contract.schema_files"
DATA = [SCHEMA_FILES, *(f"{SCHEMA_FILES}.{p}" for p in find_namespace_packages(where="schemas"))]

setup(
    packages=[*find_packages(include=["worker", "worker.*"]), *DATA],
    package_dir={SCHEMA_FILES: "schemas"},
    package_data={name: ["*.json", "*.yaml"] for name in DATA},
)
