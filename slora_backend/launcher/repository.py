"""The launcher's copy of the model repository: the three models, with ``engine.json`` updated."""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..serving.engine_json import engine_json_path, read_engine_json, write_engine_json
from .options import SOURCE_REPOSITORY

MODELS = ("slora_engine", "slora_adapters", "slora")


def write_repository(dest: Path, engine_settings: Mapping[str, Any],
                     source: Path = SOURCE_REPOSITORY) -> Path:
    """Copy the three models from ``source`` into ``dest`` (replacing what is there), with
    ``engine_settings`` written over the source's ``engine.json``; returns ``dest``."""
    for model in MODELS:
        if not (source / model / "config.pbtxt").is_file():
            raise FileNotFoundError(f"{source} has no model {model!r} (no config.pbtxt)")
    settings = {**read_engine_json(engine_json_path(source)), **engine_settings}
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for model in MODELS:
        shutil.copytree(source / model, dest / model,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        (dest / model / "1").mkdir(exist_ok=True)  # an ensemble needs its (empty) version dir
    write_engine_json(engine_json_path(dest), settings)
    return dest
