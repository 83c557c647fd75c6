"""Node.js for the interop tests: find it, install the npm packages a test needs."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import NoReturn

import pytest

from tests.conftest import IN_CI

#: This folder: the Node scripts and their package.json files.
HERE = Path(__file__).resolve().parent


def _unavailable(reason: str) -> NoReturn:
    if IN_CI:
        pytest.fail(f"{reason} (CI=true: the Node interop tests may not skip)")
    pytest.skip(reason)


def node_with(package: str, directory: Path = HERE) -> str:
    """Path of ``node``, with ``package`` installed under ``directory`` (npm install)."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        _unavailable("node and npm are not installed")
    if not (directory / "node_modules" / package / "package.json").is_file():
        done = subprocess.run(
            [npm, "install", "--prefix", str(directory), "--no-audit", "--no-fund",
             "--ignore-scripts", "--loglevel=error"],
            capture_output=True,
            text=True,
            timeout=240,
        )  # fmt: skip
        if done.returncode != 0:
            _unavailable(f"npm install in {directory} failed: {done.stderr[-2000:]}")
    return node
