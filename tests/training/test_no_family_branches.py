"""The training loop and the HF stages ask the model family's spec; branches on it must not come back."""

import re
from pathlib import Path

import pytest

import pilelm

PACKAGE = Path(pilelm.__file__).parent
FAMILY_FREE = ["training/trainer.py", "training/init_from.py", "training/loader.py", "training/metrics_log.py",
               "training/memory.py", "training/checkpoint.py", "interop/hf.py", "interop/adapter.py"]
BRANCH = re.compile(r"""family\s*[!=]=|["'](gpt|bert)["']|isinstance\([^)]*(GPTConfig|BertConfig|GPT|Bert)\)""")


@pytest.mark.parametrize("module", FAMILY_FREE)
def test_module_has_no_model_family_branches(module):
    source = (PACKAGE / module).read_text()
    assert source.strip(), f"{module} is empty: this test would pass vacuously"
    hits = [line.strip() for line in source.splitlines() if BRANCH.search(line)]
    assert not hits, f"{module} branches on the model family; ask its ModelSpec instead: {hits}"


def test_the_pattern_catches_the_branches_it_is_for():
    for line in ['if cfg.family == "gpt":', "x = 'bert'", "isinstance(cfg, GPTConfig)", "family != x"]:
        assert BRANCH.search(line), line
