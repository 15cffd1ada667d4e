import dataclasses
import json
import logging

import pytest

from llmshrink import UsageError
import llmshrink.methods as method_registry
from llmshrink.config import MethodConfig
from llmshrink.methods import METHODS, Method, config_from_dict, load_builtin_methods, method_for, register
from llmshrink.gptq.config import GPTQConfig, RTNConfig


def test_gptq_config_round_trips_through_json():
    config = GPTQConfig(bits=3, group_size=64, desc_act=True, dynamic={"re:.*down_proj": {"bits": 8}})
    data = json.loads(json.dumps(config.to_dict()))
    assert data["method"] == "gptq" and data["version"] == 1
    assert GPTQConfig.from_dict(data) == config


def test_every_registered_config_round_trips_and_no_field_shadows_the_registry_keys():
    assert {"gptq", "rtn", "layer_prune", "weight_prune", "heal", "delta", "finetune", "pack"} <= set(
        load_builtin_methods())
    for name, method in METHODS.items():
        cls = method.config
        assert not {"method", "version"} & {f.name for f in dataclasses.fields(cls)}, name
        assert config_from_dict(json.loads(json.dumps(cls().to_dict()))) == cls(), name
    rtn = GPTQConfig(algorithm="rtn", bits=3)  # once a field named `method` overwrote the registry key
    assert config_from_dict(rtn.to_dict()) == rtn
    assert config_from_dict({"method": "rtn", "bits": 8}) == RTNConfig(bits=8)
    with pytest.raises(UsageError, match="use a gptq step"):
        RTNConfig(algorithm="gptq")


@pytest.mark.parametrize("kwargs,message", [
    (dict(bits=5), "bits=5 is not supported; use one of 2, 3, 4, 8"),
    (dict(group_size=0), "group_size=0 is invalid"),
    (dict(group_size=-2), "group_size=-2 is invalid"),
    (dict(damp_percent=1.5), "damp_percent=1.5 must be between 0 and 1"),
    (dict(algorithm="awq"), "algorithm='awq' is not known"),
    (dict(dynamic={"re:.*down_proj": {"bits": 6}}), r"bits=6 in dynamic\['re:.\*down_proj'\]"),
    (dict(dynamic={"re:.*down_proj": {"colour": 1}}), "cannot override 'colour'"),
    (dict(dynamic={"re:([": {}}), "not a valid regex"),
])
def test_bad_values_name_the_field_and_the_fix(kwargs, message):
    with pytest.raises(UsageError, match=message):
        GPTQConfig(**kwargs)


def test_per_module_overrides_and_skips():
    config = GPTQConfig(dynamic={"re:.*mlp.down_proj": {"bits": 8}, "-:.*layers.0.self_attn.*": {}})
    assert config.for_module("model.layers.3.mlp.down_proj").bits == 8
    assert config.for_module("model.layers.3.mlp.up_proj").bits == 4
    assert config.for_module("model.layers.0.self_attn.q_proj") is None
    assert config.for_module("lm_head") is None and GPTQConfig(lm_head=True).for_module("lm_head") is not None
    assert config.to_gptq_dynamic() == {"+:.*mlp.down_proj": {"bits": 8}, "-:.*layers.0.self_attn.*": {}}


def test_unknown_keys_warn_with_the_nearest_name(caplog):
    with caplog.at_level(logging.WARNING):
        config = GPTQConfig.from_dict({"method": "gptq", "version": 1, "bitz": 3, "group_size": 32})
    assert config.group_size == 32 and "did you mean 'bits'" in caplog.text


def test_newer_versions_and_unknown_methods_fail():
    with pytest.raises(UsageError, match="newer than this llmshrink understands"):
        GPTQConfig.from_dict({"method": "gptq", "version": 99})
    with pytest.raises(UsageError, match="unknown method 'nope'"):
        config_from_dict({"method": "nope"})


def test_registry_maps_config_types_to_methods(monkeypatch):
    @dataclasses.dataclass
    class ToyConfig(MethodConfig):
        METHOD = "toy"
        strength: int = 1

    monkeypatch.setattr(method_registry, "METHODS", {"gptq": METHODS["gptq"]})  # a private registry for this test
    toy = register(Method(config=ToyConfig, run=lambda source, config, out, context: None, output="dense"))
    assert config_from_dict({"method": "toy", "strength": 3}) == ToyConfig(strength=3)
    assert method_for(ToyConfig(strength=3)) is toy and method_for("toy") is toy
    with pytest.raises(ValueError, match="already registered"):
        register(Method(config=ToyConfig, run=toy.run))

    @dataclasses.dataclass
    class Impostor(MethodConfig):  # claims the name, is not the registered config
        METHOD = "toy"

    with pytest.raises(UsageError, match="Impostor is not the config of method 'toy'"):
        method_for(Impostor())