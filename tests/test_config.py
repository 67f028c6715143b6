import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from deme_ray.config import SECTIONS, ExperimentConfig, load_config, parse_override, starter_yaml, validate
from deme_ray.errors import ConfigError


def test_defaults_are_the_embedded_default():
    cfg = load_config()
    assert cfg.model.base == "bundled:digits" and cfg.data.train == "bundled:digits"
    assert cfg.decouple.p_global == 0.3 and cfg.decouple.consistency_weight == 1.0
    assert cfg.decouple.channel_projection is True


def test_public_keys_exist_as_written():
    cfg = ExperimentConfig()
    for dotted in [
        "seed", "output_dir", "model.base", "data.train", "data.resolution", "data.held_out",
        "decouple.num_ranges", "decouple.boundaries", "decouple.p_global", "decouple.consistency_weight",
        "decouple.channel_projection", "decouple.steps", "decouple.batch_size", "decouple.learning_rate",
        "decouple.checkpoint_every", "decouple.workers_per_expert", "decouple.use_gpu", "decouple.ema_decay",
    ]:
        node = cfg
        for part in dotted.split("."):
            assert hasattr(node, part), dotted
            node = getattr(node, part)


def test_unknown_key_suggests_the_closest(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("decouple:\n  p_globl: 0.5\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'decouple.p_globl': did you mean 'decouple.p_global'\?"):
        load_config(path)


def test_wrong_type_names_the_key():
    with pytest.raises(ConfigError, match=r"decouple.steps: .*integer"):
        load_config(None, ["decouple.steps=many"])


def test_overrides_are_yaml_data_never_evaluated():
    cfg = load_config(None, ["decouple.boundaries=[0, 100, 1000]", "decouple.use_gpu=false", "seed=7"])
    assert cfg.decouple.boundaries == [0, 100, 1000] and cfg.decouple.use_gpu is False and cfg.seed == 7
    assert parse_override("output_dir=__import__('os').getcwd()")[1] == "__import__('os').getcwd()"
    with pytest.raises(ConfigError, match="dotted.key=value"):
        load_config(None, ["decouple.steps"])


def test_num_ranges_and_boundaries_are_exclusive():
    with pytest.raises(ConfigError, match="not both"):
        load_config(None, ["decouple.num_ranges=2", "decouple.boundaries=[0, 1000]"])


@pytest.mark.parametrize("bad", ["[0, 500, 500, 1000]", "[0, 600, 400, 1000]", "[10, 1000]", "[0]"])
def test_bad_boundaries_rejected(bad):
    with pytest.raises(ConfigError, match="decouple.boundaries"):
        load_config(None, [f"decouple.boundaries={bad}"])


def test_starter_file_lists_every_key_and_validates():
    text = starter_yaml()
    assert validate(yaml.safe_load(text)) == ExperimentConfig()
    for section, model in SECTIONS.items():
        for key in model.model_fields:
            assert (f"  {key}:" if section else f"\n{key}:") in text, key
    assert text.count("  # ") == sum(len(m.model_fields) for name, m in SECTIONS.items() if name)


def test_missing_config_file_says_how_to_make_one(tmp_path):
    with pytest.raises(ConfigError, match="deme-ray init"):
        load_config(tmp_path / "nope.yaml")


@given(st.floats(allow_nan=True, allow_infinity=True))
def test_p_global_accepted_exactly_within_unit_interval(p):
    try:
        cfg = validate({"decouple": {"p_global": p}})
        assert 0 <= cfg.decouple.p_global <= 1
    except ConfigError:
        assert not (0 <= p <= 1)


@given(st.lists(st.integers(min_value=-5, max_value=1200), min_size=0, max_size=6))
def test_boundaries_accepted_only_when_strictly_increasing_from_zero(values):
    ok = len(values) >= 2 and values[0] == 0 and all(b > a for a, b in zip(values, values[1:]))
    try:
        validate({"decouple": {"boundaries": values}})
        assert ok
    except ConfigError:
        assert not ok
