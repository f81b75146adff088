import pytest

from pilelm.models import families, get_spec
from pilelm.training.config import TrainConfig


@pytest.mark.parametrize("family", families())
def test_the_train_config_has_a_section_for_every_family(family):
    spec = get_spec(family)
    cfg = TrainConfig(family=family)
    assert cfg.spec is spec
    assert isinstance(cfg.model_config, spec.config_cls)
    assert cfg.model_config is getattr(cfg, spec.config_section)
