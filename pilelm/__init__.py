"""pilelm: from raw Pile shards to a trained, evaluated, served language model.

    import pilelm
    lm = pilelm.load("runs/demo/train")   # see pilelm.api
    pilelm.finetune("runs/demo/train", task="classify", data=["train.jsonl"], output="runs/cls")

``pilelm.load`` and one function per command (``pilelm.prepare``, ``pilelm.train``,
``pilelm.eval``, ... see ``pilelm.stage_functions``) are imported on first use, so ``import
pilelm`` stays instant.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_API = {"load": "pilelm.api", "LanguageModel": "pilelm.api", "FinetunedModel": "pilelm.api"}


def __getattr__(name: str) -> Any:
    import importlib

    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    from pilelm.stage_functions import FUNCTIONS, stage_function

    if name in FUNCTIONS:
        return stage_function(name)
    raise AttributeError(f"module 'pilelm' has no attribute {name!r}")


def __dir__() -> list[str]:
    from pilelm.stage_functions import FUNCTIONS

    return sorted([*globals(), *_API, *FUNCTIONS])
