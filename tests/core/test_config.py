from dataclasses import dataclass, field
from typing import Literal

import pytest

from pilelm.core.config import ConfigError, describe_config, load_config, require_at_least, to_dict


@dataclass
class Inner:
    lr: float = 1e-3
    """Peak learning rate."""
    schedule: Literal["cosine", "wsd"] = "cosine"
    """Schedule shape."""


@dataclass
class Outer:
    name: str = "x"
    """Run name."""
    steps: int = 10
    """Optimizer steps."""
    tags: list[str] = field(default_factory=list)
    """Free-form tags."""
    limit: int | None = None
    """Optional limit."""
    inner: Inner = field(default_factory=Inner)
    """Optimizer section."""

    def __post_init__(self):
        if self.steps < 0:
            raise ValueError("steps must be >= 0")


def test_defaults_yaml_then_overrides(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("steps: 5\ninner:\n  lr: 0.1\n")
    cfg = load_config(Outer, y, ["inner.lr=3e-4", "tags=a,b", "limit=7"])
    assert cfg.steps == 5 and cfg.inner.lr == pytest.approx(3e-4)
    assert cfg.tags == ["a", "b"] and cfg.limit == 7
    assert cfg.inner.schedule == "cosine"


def test_unknown_key_lists_valid_ones():
    with pytest.raises(ConfigError) as e:
        load_config(Outer, overrides=["inner.lrr=1"])
    assert "inner.lrr" in str(e.value) and "inner.lr" in str(e.value) and "inner.schedule" in str(e.value)


def test_bad_types_and_validation_are_errors():
    with pytest.raises(ConfigError, match="steps"):
        load_config(Outer, overrides=["steps=abc"])
    with pytest.raises(ConfigError, match="schedule"):
        load_config(Outer, overrides=["inner.schedule=linear"])
    with pytest.raises(ValueError, match="steps must be"):
        load_config(Outer, overrides=["steps=-1"])


def test_roundtrip_and_help():
    cfg = load_config(Outer, overrides=["inner.lr=0.5", "limit=none"])
    assert load_config(Outer, overrides=to_dict(cfg)) == cfg
    text = describe_config(Outer)
    assert "inner.lr=0.001" in text and "Peak learning rate." in text and "Free-form tags." in text


def test_require_at_least_names_the_first_key_below_the_bound():
    from types import SimpleNamespace

    cfg = SimpleNamespace(steps=3, batch=0, patience=-1)
    require_at_least(cfg, 0, ("steps", "batch"))  # within bounds: no error
    with pytest.raises(ValueError, match=r"^loop\.batch must be >= 1, got 0$"):
        require_at_least(cfg, 1, ("steps", "batch", "patience"), prefix="loop.")
    with pytest.raises(ValueError, match=r"^patience must be >= 0, got -1$"):
        require_at_least(cfg, 0, ("patience",))
