"""Pythia's pre-tokenized Pile: MMIDIDX files as EleutherAI publishes them."""

from __future__ import annotations

from pathlib import Path

from pilelm.tokens.mmidx import IndexedDataset, mmidx_prefix


def open_pythia(path: str | Path) -> IndexedDataset:
    """Pythia's pre-tokenized Pile (``pile_0.87_deduped_text_document.bin/.idx`` or the
    ``document.bin/.idx`` of EleutherAI/pile-*-pythia-preshuffled after merging its shards):
    MMIDIDX, uint16, GPT-NeoX-20B tokenizer, ``<|endoftext|>`` (id 0) after every document.

    ``path`` is the prefix or either file. The shards ``document-00000-of-00020.bin`` ... are
    the .bin cut in pieces; join them first (``cat document-*-of-*.bin > document.bin``).
    """
    prefix = mmidx_prefix(path)
    if not prefix.with_suffix(".bin").is_file():
        pieces = sorted(prefix.parent.glob(f"{prefix.name}-*-of-*.bin"))
        if pieces:
            raise FileNotFoundError(
                f"{prefix}.bin does not exist but {len(pieces)} shards of it do; join them first: "
                f"cat {prefix}-*-of-*.bin > {prefix}.bin"
            )
    return IndexedDataset(prefix)
