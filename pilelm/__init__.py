"""pilelm: from raw Pile shards to a trained, evaluated, served language model.

    import pilelm
    lm = pilelm.load("runs/demo/train")   # see pilelm.api
    pilelm.fine_tune("runs/demo/train", task="classify", data=["train.jsonl"], output="runs/cls")

``pilelm.load`` and one function per command (``pilelm.prepare``, ``pilelm.train``,
``pilelm.eval``, ... see ``pilelm.stage_functions``) are imported on first use, so ``import
pilelm`` stays instant.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_API = {"load": "pilelm.api", "LanguageModel": "pilelm.api", "FinetunedModel": "pilelm.api"}


# Reached by name, as the stage table reaches stages: the package's own modules import
# ``__version__`` from here, so a plain import would close a circle.
_STAGE_FUNCTIONS = "pilelm.stage_functions"


def __getattr__(name: str) -> Any:
    import importlib

    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    stages = importlib.import_module(_STAGE_FUNCTIONS)
    if name in stages.FUNCTIONS:
        return stages.stage_function(name)
    raise AttributeError(f"module 'pilelm' has no attribute {name!r}")


def __dir__() -> list[str]:
    import importlib

    return sorted([*globals(), *_API, *importlib.import_module(_STAGE_FUNCTIONS).FUNCTIONS])
