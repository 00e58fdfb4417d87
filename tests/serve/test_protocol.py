"""OpenAI bodies built by serve/protocol.py."""

from __future__ import annotations

import pytest


def test_templated_text_chunks_equal_the_built_ones() -> None:
    import json

    from lorakit.serve.protocol import chunk_body, text_chunk_sse

    for chat in (True, False):
        event = text_chunk_sse("cmpl-1", "a/b \"odd\" name", chat)
        for piece in ("plain", 'quote " and \\ backslash\n', "ünïcode ✓", ""):
            text = event(piece)
            assert text.startswith("data: ") and text.endswith("\n\n")
            body = json.loads(text[len("data: "):])
            expected = chunk_body("cmpl-1", "a/b \"odd\" name", chat, piece, None)
            expected["created"] = body["created"]
            if chat and not piece:
                expected["choices"][0]["delta"] = {"content": ""}  # the template always carries the content key
            assert body == expected


def test_serve_compiles_unless_told_not_to() -> None:
    from lorakit.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["serve"]).compile is True
    assert parser.parse_args(["serve", "--no-compile"]).compile is False


def completion_with_mix(weight) -> dict:
    return {"model": "base", "prompt": "x", "adapters": {"one": 0.5, "two": weight}}


@pytest.mark.parametrize("weight", [1e38, float("inf"), float("-inf"), float("nan"), -1e9, 100.5, 10**400])
def test_an_adapter_weight_beyond_the_bound_is_refused_naming_the_field(weight) -> None:
    from lorakit.serve.protocol import ApiError, parse_request

    with pytest.raises(ApiError) as caught:
        parse_request(completion_with_mix(weight), chat=False)
    error = caught.value
    assert error.status == 400 and error.param == "adapters"
    assert "'two'" in error.message and "-100 to 100" in error.message


@pytest.mark.parametrize("weight", [0.5, -0.5, 0, 100, -100])
def test_finite_adapter_weights_within_the_bound_are_kept(weight) -> None:
    from lorakit.serve.protocol import parse_request

    assert parse_request(completion_with_mix(weight), chat=False).adapters == {"one": 0.5, "two": float(weight)}


def test_a_nan_sampling_number_is_refused() -> None:
    from lorakit.serve.protocol import ApiError, parse_request

    with pytest.raises(ApiError) as caught:
        parse_request({"model": "base", "prompt": "x", "temperature": float("nan")}, chat=False)
    assert caught.value.param == "temperature"
