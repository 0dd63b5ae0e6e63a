"""The config system: validated dotted overrides on frozen dataclasses."""
import dataclasses
from typing import Literal, Optional

import pytest

from rlhf_jax.config import (ConfigError, apply_overrides, from_dict, load_config_file,
                             to_dict)


@dataclasses.dataclass(frozen=True)
class Optim:
    lr: float = 1e-3
    warmup_steps: int = 10
    schedule: Literal["cosine", "linear", "constant"] = "cosine"


@dataclasses.dataclass(frozen=True)
class Cfg:
    seed: int = 0
    name: str = "run"
    kl_target: Optional[float] = 6.0
    stop_ids: tuple[int, ...] = (2,)
    use_value_head: bool = False
    optim: Optim = Optim()


def test_override_nested_and_prefixed_forms():
    cfg = apply_overrides(Cfg(), ["optim.lr=0.02", "--config.seed=3", "config.name=abc"])
    assert cfg.optim.lr == 0.02 and isinstance(cfg.optim.lr, float)
    assert cfg.seed == 3 and cfg.name == "abc"
    assert Cfg().optim.lr == 1e-3  # the original is untouched (frozen, copied)


def test_override_types():
    cfg = apply_overrides(Cfg(), ["kl_target=None", "stop_ids=2,5", "use_value_head=true",
                                  "optim.lr=1", "optim.schedule=linear"])
    assert cfg.kl_target is None
    assert cfg.stop_ids == (2, 5)
    assert cfg.use_value_head is True
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.optim.schedule == "linear"


@pytest.mark.parametrize("override,needle", [
    ("optim.lrr=1", "optim.lrr"),
    ("nope=1", "nope"),
    ("seed=abc", "seed"),
    ("seed=1.5", "seed"),
    ("use_value_head=3", "use_value_head"),
    ("optim.schedule=exp", "optim.schedule"),
    ("optim=3", "optim"),
    ("seed", "KEY=VALUE"),
])
def test_bad_overrides_name_the_key(override, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        apply_overrides(Cfg(), [override])


def test_from_dict_round_trip_and_unknown_key():
    cfg = apply_overrides(Cfg(), ["optim.lr=0.5", "stop_ids=7"])
    again = from_dict(Cfg, to_dict(cfg))
    assert again == cfg
    with pytest.raises(ConfigError, match=r"optim\.bogus"):
        from_dict(Cfg, {"optim": {"bogus": 1}})


def test_load_config_file(tmp_path):
    path = tmp_path / "exp.py"
    path.write_text("from tests.test_config import Cfg\n"
                    "def get_config():\n    return Cfg(seed=11)\n")
    assert load_config_file(path).seed == 11
    with pytest.raises(ConfigError, match="does not exist"):
        load_config_file(tmp_path / "missing.py")
    (tmp_path / "bad.py").write_text("x = 1\n")
    with pytest.raises(ConfigError, match="get_config"):
        load_config_file(tmp_path / "bad.py")
