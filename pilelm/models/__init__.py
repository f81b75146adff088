"""Model families, one ``ModelSpec`` each (``spec.py``; registered in ``families.py``).

A saved model is ``model.safetensors`` + ``model.json`` = {"family": NAME, "config": {...}}.
"""

from __future__ import annotations

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

__all__ = ["ModelSpec", "build_model", "config_from_spec", "families", "get_spec", "model_spec", "spec_for"]
