"""serve/adapter_root.py: client paths confined to --adapter-root, the adapter's files regular files."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from lorakit.serve.adapter_root import inside_root, require_regular_files, require_root
from lorakit.serve.protocol import ApiError


@pytest.fixture
def root(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    (root / "ok").mkdir(parents=True)
    (root / "ok" / "adapter_config.json").write_text("{}")
    (root / "ok" / "adapter_model.safetensors").write_bytes(b"\0")
    return root


def refusal(root: Path, name: str) -> ApiError:
    with pytest.raises(ApiError) as caught:
        require_regular_files(root, inside_root(root, name))
    return caught.value


def test_regular_files_and_missing_ones_pass(root: Path) -> None:
    require_regular_files(root, inside_root(root, "ok"))
    (root / "empty").mkdir()
    require_regular_files(root, inside_root(root, "empty"))  # the registry says which file is missing


def test_a_symlink_to_a_regular_file_inside_the_root_passes(root: Path) -> None:
    (root / "linked").mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (root / "linked" / name).symlink_to(root / "ok" / name)
    require_regular_files(root, inside_root(root, "linked"))


@pytest.mark.parametrize("name", ["adapter_config.json", "adapter_model.safetensors"])
def test_a_fifo_is_refused_naming_the_file(root: Path, name: str) -> None:
    (root / "ok" / name).unlink()
    os.mkfifo(root / "ok" / name)
    error = refusal(root, "ok")
    assert error.status == 400 and error.param == "lora_path"
    assert f"ok/{name}" in error.message and "not a regular file (a FIFO)" in error.message


def test_a_symlink_to_a_fifo_a_directory_or_a_socket_is_refused(root: Path) -> None:
    weights = root / "ok" / "adapter_model.safetensors"
    weights.unlink()
    os.mkfifo(root / "the-fifo")
    weights.symlink_to(root / "the-fifo")
    assert "(a FIFO)" in refusal(root, "ok").message
    weights.unlink()
    weights.mkdir()
    assert "(a directory)" in refusal(root, "ok").message
    weights.rmdir()
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(weights))
        assert "(a socket)" in refusal(root, "ok").message


def test_a_file_linked_out_of_the_root_is_forbidden(root: Path, tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere.json"
    outside.write_text("{}")
    config = root / "ok" / "adapter_config.json"
    config.unlink()
    config.symlink_to(outside)
    error = refusal(root, "ok")
    assert error.status == 403 and "adapter_config.json" in error.message


def test_a_symlink_loop_is_refused(root: Path) -> None:
    config = root / "ok" / "adapter_config.json"
    config.unlink()
    config.symlink_to(config)
    assert "symlink loop" in refusal(root, "ok").message


def test_loading_is_off_without_a_root() -> None:
    with pytest.raises(ApiError) as caught:
        require_root(None)
    assert caught.value.status == 404
