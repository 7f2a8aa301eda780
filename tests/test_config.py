"""The seed config format: merge, derived names, blocks, validation messages and YAML round trip."""

from __future__ import annotations

import pytest
import yaml
from conftest import PRESETS

from vitq import BitTypeConfig, ConfigError, LayerQuantConfig, QuantConfig, load_config_from_yaml
from vitq.quant.config import POINTS


def test_presets_load_with_all_points():
    for name in ("int8", "w4a8", "fqvit"):
        cfg = load_config_from_yaml(PRESETS / f"{name}.yaml")
        raw = yaml.safe_load((PRESETS / f"{name}.yaml").read_text())
        named = sum(len(raw.get(s) or {}) for s in ("layers", "attn_layer", "residual_layer"))
        assert 0 < named < 14  # the seed's inheritance: default plus only the points that differ
        assert set(cfg.resolved()) == set(POINTS)
    w4a8 = load_config_from_yaml(PRESETS / "w4a8.yaml")
    assert w4a8.resolve("attn_qkv").bit_type.name == "int4"
    assert w4a8.resolve("kv_act").bit_type.name == "int8"
    fq = load_config_from_yaml(PRESETS / "fqvit.yaml")
    soft = fq.resolve("intSoft")
    assert (soft.quantization_method, soft.bit_type.bits) == ("Log2", 4)
    assert fq.resolve("mlp_act").bit_type.name == "uint8" and fq.resolve("mlp_act").calibration_mode == "layer_wise"
    assert fq.resolve("mlp_fc1").observer_type == "MinmaxObserver"


def test_partial_override_inherits_and_names_derive():
    cfg = LayerQuantConfig.from_dict({
        "default": {"observer_type": "OmseObserver", "percentile_alpha": 0.97,
                    "bit_type": {"bits": 8, "signed": False, "name": "uint8"}},
        "layers": {"attn_qkv": {"bit_type": {"bits": 4}}},
    })
    q = cfg.resolve("attn_qkv")
    assert q.bit_type == BitTypeConfig(bits=4, signed=False)
    assert q.bit_type.name == "uint4"  # derived, not inherited from default's 'uint8'
    assert q.observer_type == "OmseObserver" and q.percentile_alpha == 0.97
    assert cfg.resolve("mlp_fc1").bit_type.name == "uint8"


def test_block_overrides_take_priority():
    cfg = LayerQuantConfig.from_dict({
        "layers": {"mlp_fc1": {"bit_type": {"bits": 6}, "observer_type": "MinmaxObserver"}},
        "blocks": {3: {"layers": {"mlp_fc1": {"bit_type": {"bits": 3}}}}, "1": {"attn_layer": {"kv_act": {
            "enabled": False}}}},
    })
    assert cfg.resolve("mlp_fc1").bit_type.bits == 6
    assert cfg.resolve("mlp_fc1", block=3).bit_type.bits == 3
    assert cfg.resolve("mlp_fc1", block=3).observer_type == "MinmaxObserver"
    assert cfg.resolve("mlp_fc1", block=0).bit_type.bits == 6
    assert cfg.resolve("kv_act", block=1).enabled is False and cfg.resolve("kv_act").enabled is True


def test_round_trip(tmp_path):
    for name in ("int8", "w4a8", "fqvit"):
        c = load_config_from_yaml(PRESETS / f"{name}.yaml")
        assert load_config_from_yaml(_write(tmp_path / f"{name}.yaml", c.to_yaml())) == c
    c = LayerQuantConfig.from_dict({"layers": {"norm1": {"enabled": False}},
                                    "blocks": {2: {"residual_layer": {"residual2": {"bit_type": {"bits": 5}}}}}})
    back = load_config_from_yaml(_write(tmp_path / "b.yaml", c.to_yaml()))
    assert back == c and back.resolve("residual2", 2).bit_type.bits == 5
    assert back != LayerQuantConfig()


def test_with_overrides_rederives_name():
    c = load_config_from_yaml(PRESETS / "int8.yaml").with_overrides({"layers.attn_qkv.bit_type.bits": 4})
    assert c.resolve("attn_qkv").bit_type.name == "int4"


def test_uniform_quant_config_form():
    c = LayerQuantConfig.uniform(QuantConfig(bit_type=BitTypeConfig(bits=6), observer_type="KLObserver"))
    assert all(q.bit_type.bits == 6 and q.observer_type == "KLObserver" for q in c.resolved().values())


def _write(path, text):
    path.write_text(text)
    return path


BAD = [
    ({"defaults": {}}, "defaults", "default"),
    ({"layers": {"attn_qvk": {}}}, "layers.attn_qvk", "attn_qkv"),
    ({"layers": {"kv_act": {}}}, "layers.kv_act", "attn_layer"),
    ({"layers": {"attn_qkv": {"observer": "MinmaxObserver"}}}, "layers.attn_qkv.observer", "observer_type"),
    ({"layers": {"attn_qkv": {"bit_type": {"bits": 1}}}}, "layers.attn_qkv.bit_type.bits", "2..16"),
    ({"layers": {"attn_qkv": {"bit_type": {"bits": 17}}}}, "layers.attn_qkv.bit_type.bits", "2..16"),
    ({"layers": {"attn_qkv": {"bit_type": {"bits": "8"}}}}, "layers.attn_qkv.bit_type.bits", "integer"),
    ({"default": {"bit_type": {"signed": "yes"}}}, "default.bit_type.signed", "true or false"),
    ({"attn_layer": {"kv_act": {"observer_type": "MinMaxObserver"}}}, "attn_layer.kv_act.observer_type",
     "MinmaxObserver"),
    ({"default": {"percentile_alpha": 0.3}}, "default.percentile_alpha", "(0.5, 1]"),
    ({"residual_layer": {"residual1": {"percentile_alpha": 1.5}}}, "residual_layer.residual1.percentile_alpha",
     "(0.5, 1]"),
    ({"default": {"percentile_sigma": 0}}, "default.percentile_sigma", "(0, 1]"),
    ({"default": {"kv_bins": 4}}, "default.kv_bins", "in 16..65536"),
    ({"layers": {"attn_qkv": {"quantization_method": "Log2"}}}, "layers.attn_qkv.quantization_method", "intSoft"),
    ({"attn_layer": {"intSoft": {"quantization_method": "Log2", "bit_type": {"bits": 12}}}},
     "attn_layer.intSoft.bit_type.bits", "Log2"),
    ({"layers": {"mlp_fc1": {"bit_type": {"bits": 4, "name": "int8"}}}}, "layers.mlp_fc1.bit_type.name", "int4"),
    ({"default": {"calibration_mode": "channelwise"}}, "default.calibration_mode", "channel_wise"),
    ({"default": {"quantization_method": "uniform"}}, "default.quantization_method", "Uniform"),
    ({"blocks": {"x": {}}}, "blocks.x", "integer"),
    ({"blocks": {0: {"layers": {"mlp_fc3": {}}}}}, "blocks.0.layers.mlp_fc3", "mlp_fc1"),
    ({"layers": ["attn_qkv"]}, "layers", "mapping"),
]


@pytest.mark.parametrize(("data", "path", "hint"), BAD, ids=[b[1] for b in BAD])
def test_bad_config_names_path(tmp_path, data, path, hint):
    f = _write(tmp_path / "bad.yaml", yaml.safe_dump(data))
    with pytest.raises(ConfigError) as ei:
        load_config_from_yaml(f)
    assert ei.value.path == path
    assert path in str(ei.value) and hint in str(ei.value)


def test_not_a_mapping_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config_from_yaml(_write(tmp_path / "list.yaml", "- 1\n- 2\n"))
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config_from_yaml(_write(tmp_path / "broken.yaml", "default: {bits: [\n"))
    with pytest.raises(ConfigError, match="not found") as ei:
        load_config_from_yaml(tmp_path / "nope.yaml")
    assert "nope.yaml" in ei.value.path


def test_did_you_mean():
    with pytest.raises(ConfigError, match="Did you mean 'PercentileObserver'"):
        QuantConfig(observer_type="PercentilObserver")


def test_an_observer_field_is_refused_only_where_no_point_reads_it():
    """``percentile_alpha``/``percentile_sigma``/``kv_bins`` set on the command line must reach a point whose observer
    reads them (in some block); else the run is the one without them, and it is refused naming the key."""
    from vitq.sweep import check_fields_read

    int8 = load_config_from_yaml(PRESETS / "int8.yaml")  # weights Minmax, activations Percentile
    check_fields_read(int8, ["default.percentile_alpha=0.99", "attn_layer.kv_act.percentile_alpha=0.9",
                             "layers.attn_qkv.bit_type.bits=4", "attn_layer.*.kv_bins=512"])  # (wildcards: a search's)
    kl = int8.with_overrides({"attn_layer.kv_act.observer_type": "KLObserver"})
    check_fields_read(kl, ["attn_layer.kv_act.kv_bins=512", "default.kv_bins=1024"])
    with pytest.raises(ConfigError, match=r"^blocks.1.layers.attn_qkv.percentile_alpha: changes nothing: only "
                                          r"PercentileObserver reads percentile_alpha, and attn_qkv uses "
                                          r"MinmaxObserver"):
        check_fields_read(int8, ["+blocks.1.layers.attn_qkv.percentile_alpha=0.99"])
    one_block = int8.with_overrides({"blocks.1.layers.attn_qkv.observer_type": "PercentileObserver"})
    check_fields_read(one_block, ["+blocks.1.layers.attn_qkv.percentile_alpha=0.99",
                                  "layers.attn_qkv.percentile_alpha=0.99"])  # block 1 reads it
    with pytest.raises(ConfigError, match=r"^default.kv_bins: changes nothing: only KLObserver reads kv_bins"):
        check_fields_read(int8, ["default.kv_bins=1024"])


def test_a_range_field_of_a_log2_point_is_refused():
    """A Log2 point (FQ-ViT's softmax output) reads its bit width alone: its observer, calibration mode, sign and
    observer fields set on the command line change nothing, and are refused; where another block quantizes the point
    uniformly, or ``default`` reaches other points, they are read."""
    from vitq.sweep import check_fields_read

    fqvit = load_config_from_yaml(PRESETS / "fqvit.yaml")  # intSoft: 4-bit Log2
    for field, value in (("observer_type", "KLObserver"), ("calibration_mode", "channel_wise"),
                         ("bit_type.signed", "true"), ("percentile_alpha", "0.99"), ("kv_bins", "512")):
        with pytest.raises(ConfigError, match=rf"^attn_layer.intSoft.{field}: changes nothing: intSoft uses Log2 "
                                              r"quantization, which reads bit_type.bits alone"):
            check_fields_read(fqvit, [f"attn_layer.intSoft.{field}={value}"])
    check_fields_read(fqvit, ["attn_layer.intSoft.bit_type.bits=3", "default.observer_type=OmseObserver",
                              "default.bit_type.signed=false", "attn_layer=a4", "default=omse",
                              "attn_layer.intSoft={bit_type:{bits:4}}"])  # (groups and whole points: not fields)
    uniform_in_one = fqvit.with_overrides({"blocks.2.attn_layer.intSoft.quantization_method": "Uniform"})
    check_fields_read(uniform_in_one, ["attn_layer.intSoft.observer_type=KLObserver"])  # block 2 reads it
    with pytest.raises(ConfigError, match=r"^blocks.1.attn_layer.intSoft.observer_type: changes nothing"):
        check_fields_read(uniform_in_one, ["+blocks.1.attn_layer.intSoft.observer_type=KLObserver"])
