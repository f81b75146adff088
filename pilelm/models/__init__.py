"""Model families, one ``ModelSpec`` each (``spec.py``).

The shipped families are registered in ``families.py``; a family that is a folder
``pilelm/models/NAME/`` (config, module and ``ModelSpec`` together) registers itself in its
``__init__.py``, imported here, so adding one touches no other file (its Hugging Face weight
maps live in ``pilelm/interop/``, named by ``ModelSpec.hf_adapter``).

A saved model is ``model.safetensors`` + ``model.json`` = {"family": NAME, "config": {...}}.
"""

from __future__ import annotations

import importlib
import pkgutil

from pilelm.models import families as _families  # noqa: F401  (registers the shipped families)
from pilelm.models.spec import (
    ModelSpec,
    build_model,
    config_from_spec,
    families,
    get_spec,
    model_spec,
    spec_for,
)

for _folder in pkgutil.iter_modules(__path__):
    if _folder.ispkg:  # a family folder registers its ModelSpec when imported
        importlib.import_module(f"{__name__}.{_folder.name}")

__all__ = ["ModelSpec", "build_model", "config_from_spec", "families", "get_spec", "model_spec", "spec_for"]
