"""The language-neutral contract files in ``schemas/``, generated from the models."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from worker.contract.models import OutcomeEvent, RedirectCommand

__all__ = [
    "SCHEMA_FILES",
    "check_schemas",
    "default_directory",
    "export_schemas",
    "installed_directory",
    "render_schemas",
]

#: File name → the model it is generated from, and the JSON Schema mode.
SCHEMA_FILES: dict[str, tuple[type[Any], str]] = {
    "redirect-command.v1.json": (RedirectCommand, "validation"),
    "redirect-outcome.v1.json": (OutcomeEvent, "serialization"),
}
_DIALECT = "https://json-schema.org/draft/2020-12/schema"
#: Where a wheel installs ``schemas/``, beside this module (see ``setup.py``).
_PACKAGED = Path(__file__).resolve().parent / "schema_files"
#: ``schemas/`` of a checkout, relative to the working directory.
CHECKOUT_DIRECTORY = Path("schemas")


def installed_directory() -> Path:
    """The contract files installed with the package (a checkout's ``schemas/`` if editable)."""
    if _PACKAGED.is_dir():
        return _PACKAGED
    return Path(__file__).resolve().parents[2] / "schemas"  # editable install or plain checkout


def default_directory() -> Path:
    """``./schemas`` in a checkout, otherwise the copy installed with the package."""
    return CHECKOUT_DIRECTORY if CHECKOUT_DIRECTORY.is_dir() else installed_directory()


def render_schemas() -> dict[str, str]:
    """Every schema file's text."""
    files = {}
    for name, (model, mode) in SCHEMA_FILES.items():
        schema = {"$schema": _DIALECT, **model.model_json_schema(mode=mode)}
        files[name] = json.dumps(schema, indent=2, ensure_ascii=False) + "\n"
    return files


def export_schemas(directory: Path) -> list[Path]:
    """Write the schema files; returns their paths."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in render_schemas().items():
        path = directory / name
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written


def check_schemas(directory: Path) -> list[str]:
    """Names of schema files missing or different from what the models generate."""
    drifted = []
    for name, text in render_schemas().items():
        path = directory / name
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            drifted.append(name)
    return drifted
