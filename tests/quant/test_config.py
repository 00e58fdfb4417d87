"""QuantConfig: values, validation that reports everything at once, documented fields."""

from __future__ import annotations

import pytest
import torch

from lorakit.errors import ConfigError
from lorakit.config import settings
from lorakit.quant.config import QuantConfig


def test_defaults_and_meaning():
    assert not QuantConfig().enabled
    nf4 = QuantConfig("NF4")
    assert nf4.quantization == "nf4" and nf4.is_4bit and nf4.uses_double_quant and nf4.torch_compute_dtype == torch.bfloat16
    assert not QuantConfig("nf4", double_quant=False).uses_double_quant
    assert not QuantConfig("int8").uses_double_quant
    assert QuantConfig("nf4").describe() == "nf4 + double quant, compute in bfloat16"


def test_every_problem_is_reported_together():
    with pytest.raises(ConfigError) as caught:
        QuantConfig("nf3", compute_dtype="int4", skip_modules="lm_head")
    message = str(caught.value)
    assert "\n" not in message
    assert all(part in message for part in ("nf4 | fp4 | int8 | none", "compute_dtype", "skip_modules"))


def test_double_quant_with_int8_is_an_unsupported_combination():
    with pytest.raises(ConfigError, match="double_quant applies to nf4 / fp4 only"):
        QuantConfig("int8", double_quant=True)


def test_platform_problems_name_the_device():
    assert QuantConfig("nf4").problems("cpu") == []
    problems = QuantConfig("nf4").problems("mps")
    assert len(problems) == 1 and "not available on mps" in problems[0]
    assert QuantConfig().problems("mps") == []  # no quantization, nothing to check


def test_from_dict_and_coerce():
    assert QuantConfig.from_dict({"quantization": "fp4", "double_quant": False}) == QuantConfig("fp4", False)
    with pytest.raises(ConfigError, match="unknown key 'bits'"):
        QuantConfig.from_dict({"bits": 4})
    assert QuantConfig.coerce("int8") == QuantConfig("int8")
    assert QuantConfig.coerce(None) == QuantConfig()
    with pytest.raises(ConfigError):
        QuantConfig.coerce(4)


def test_every_field_is_a_documented_setting():
    assert [f.name for f in settings(QuantConfig)] == ["quantization", "double_quant", "compute_dtype", "skip_modules"]
    assert all(f.metadata["help"] for f in settings(QuantConfig))
