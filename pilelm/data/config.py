"""The settings of ``pilelm prepare``: one typed section per step."""

from __future__ import annotations

from dataclasses import dataclass, field

from pilelm.data.canary_config import CanaryConfig
from pilelm.data.decontam import DecontamConfig
from pilelm.data.dedup import DedupConfig
from pilelm.data.executor import ExecutorConfig
from pilelm.data.filters import FilterConfig
from pilelm.data.pii import PiiConfig
from pilelm.data.readers import ReaderConfig


@dataclass
class PrepareConfig:
    inputs: list[str] = field(default_factory=list)
    """Input files, folders or globs (.jsonl, .jsonl.zst, .jsonl.gz, .parquet, folders of
    .txt), or `hf:NAME[#CONFIG][@SPLIT]` for a Hugging Face dataset. Files named val*/test*
    or inside val/ or test/ folders form those splits; the rest is train."""
    output: str = ""
    """Output directory (-o)."""
    reader: ReaderConfig = field(default_factory=ReaderConfig)
    """How records are read."""
    filters: FilterConfig = field(default_factory=FilterConfig)
    """Normalisation and quality filters."""
    pii: PiiConfig = field(default_factory=PiiConfig)
    """PII scrubbing."""
    dedup: DedupConfig = field(default_factory=DedupConfig)
    """Exact and MinHash-LSH deduplication."""
    decontam: DecontamConfig = field(default_factory=DecontamConfig)
    """Decontamination of train against evaluation text."""
    executor: ExecutorConfig = field(default_factory=ExecutorConfig)
    """Where tasks run."""
    privacy: CanaryConfig = field(default_factory=CanaryConfig)
    """Canaries planted in the train split for the memorization audit (`pilelm audit`)."""
    compression_level: int = 3
    """zstd level of the output shards."""
    overwrite: bool = False
    """Replace an output directory prepared with a different config or different inputs."""
    keep_work: bool = False
    """Keep the intermediate files in OUT/.work after success."""

    def __post_init__(self) -> None:
        if not 1 <= self.compression_level <= 22:
            raise ValueError("compression_level must be in 1..22 (zstd levels)")
