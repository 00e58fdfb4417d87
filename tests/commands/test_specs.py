"""The one parser of adapter arguments: each form's accepted syntax, and a one-line error saying what
to write for every spec it refuses."""

from __future__ import annotations

import pytest

from lorakit.cli import main
from lorakit.commands.specs import MIXED, NAMED, WEIGHTED, AdapterSpec, parse_adapter_spec, parse_adapter_specs
from lorakit.errors import LorakitError


@pytest.mark.parametrize("form, spec, expected", [
    (MIXED, "out/a", ("adapter3", "out/a", 1.0)),
    (MIXED, "math=out/a", ("math", "out/a", 1.0)),
    (MIXED, "math=out/a:0.5", ("math", "out/a", 0.5)),
    (MIXED, "out/a:-2", ("adapter3", "out/a", -2.0)),
    (MIXED, "math=out/v1:final", ("math", "out/v1:final", 1.0)),  # a tail that is no number is part of DIR
    (MIXED, "math=runs/lr=1e-4:2", ("math", "runs/lr=1e-4", 2.0)),  # the name ends at the first "="
    (NAMED, "math=out/a", ("math", "out/a", 1.0)),
    (NAMED, "math=out/a:0.5", ("math", "out/a:0.5", 1.0)),  # serve takes no scale: the colon is the path's
    (WEIGHTED, "math=out/a:0.7", ("math", "out/a", 0.7)),
    (WEIGHTED, "math=C:/x:-0.3", ("math", "C:/x", -0.3)),  # the weight follows the last colon
])
def test_accepted_specs(form, spec, expected) -> None:
    assert parse_adapter_spec(spec, form, index=3) == AdapterSpec(*expected)


@pytest.mark.parametrize("form, spec, label, message", [
    (MIXED, "a=", "--adapter", "--adapter 'a=' is not [NAME=]DIR[:SCALE]; write e.g. a=DIR"),
    (MIXED, "=out/a", "--adapter", "--adapter '=out/a' is not [NAME=]DIR[:SCALE]; write e.g. a=out/a"),
    (MIXED, "a=out/a:nan", "--adapter", "scale 'nan' in 'a=out/a:nan' must be a finite number"),
    (MIXED, "a=out/a:inf", "adapter", "scale 'inf' in 'a=out/a:inf' must be a finite number"),
    (NAMED, "out/a", "--adapter", "--adapter 'out/a' is not NAME=DIR; write e.g. a=out/a"),
    (NAMED, "a=", "--adapter", "--adapter 'a=' is not NAME=DIR; write e.g. a=DIR"),
    (WEIGHTED, "a=out/a", "adapter", "adapter 'a=out/a' is not NAME=DIR:WEIGHT; write e.g. a=out/a:0.5"),
    (WEIGHTED, "out/a:0.5", "adapter", "adapter 'out/a:0.5' is not NAME=DIR:WEIGHT; write e.g. a=out/a:0.5"),
    (WEIGHTED, "a=out/a:x", "adapter", "weight 'x' in 'a=out/a:x' is not a number; write e.g. a=out/a:0.5"),
    (WEIGHTED, "a=out/a:", "adapter", "weight '' in 'a=out/a:' is not a number"),
    (WEIGHTED, "a=out/a:nan", "adapter", "weight 'nan' in 'a=out/a:nan' must be a finite number"),
])
def test_refused_specs_are_one_line_saying_what_to_write(form, spec, label, message) -> None:
    with pytest.raises(LorakitError) as caught:
        parse_adapter_spec(spec, form, label=label)
    assert str(caught.value).startswith(message) and "\n" not in str(caught.value)


def test_unnamed_adapters_are_numbered_and_names_must_differ() -> None:
    assert [s.name for s in parse_adapter_specs(["out/a", "b=out/b", "out/c:0.5"], MIXED)] == ["adapter0", "b", "adapter2"]
    with pytest.raises(LorakitError, match="adapter name 'adapter0' is given twice; give each input its own name"):
        parse_adapter_specs(["out/a", "adapter0=out/b"], MIXED)


@pytest.mark.parametrize("argv, message", [
    (["generate", "--adapter", "a=", "--prompt", "hi"], "--adapter 'a=' is not [NAME=]DIR[:SCALE]"),
    (["eval", "a=", "--data", "x.jsonl"], "adapter 'a=' is not [NAME=]DIR[:SCALE]"),
    (["serve", "--adapter", "out/a", "--no-compile"], "--adapter 'out/a' is not NAME=DIR"),
    (["combine", "a=out/a", "-o", "never"], "adapter 'a=out/a' is not NAME=DIR:WEIGHT"),
    (["generate", "--adapter", "x=out/a", "--adapter", "x=out/b", "--prompt", "hi"], "adapter name 'x' is given twice"),
])
def test_every_command_refuses_a_bad_spec_before_loading_anything(argv, message, capsys, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and err.startswith(f"lorakit {argv[0]}: error:")
    assert list(tmp_path.iterdir()) == []
