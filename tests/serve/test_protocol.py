"""OpenAI bodies built by serve/protocol.py."""

from __future__ import annotations


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
