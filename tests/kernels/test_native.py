"""Building lorakit's C++ kernels: where it fails, one warning and the torch paths."""

import warnings

import pytest

from lorakit.kernels import decode_attention, native, routed_lora


def test_a_failed_build_warns_once_and_every_kernel_is_none(monkeypatch) -> None:
    import torch.utils.cpp_extension

    def no_ninja(*args, **kwargs):
        raise RuntimeError("Ninja is required to load C++ extensions\nmore")

    monkeypatch.setattr(native, "_built", {})
    monkeypatch.setattr(torch.utils.cpp_extension, "load", no_ninja)
    with pytest.warns(UserWarning, match=r"Ninja is required to load C\+\+ extensions\); decoding uses torch's batched matmuls"):
        assert decode_attention.load() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert routed_lora.load() is None  # no second attempt, no second warning
        assert decode_attention.load() is None


def test_the_kernels_build_here_natively_and_portably() -> None:
    assert native.ops() is not None, "a C++ compiler and ninja are set-up requirements"
    assert decode_attention.load() is not None and routed_lora.load() is not None
    assert decode_attention.load(portable=True) is not routed_lora.load(portable=True) is not None
