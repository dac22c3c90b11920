"""Checkpoint files: a digest that catches silent damage, and storage faults named with path and errno."""
import errno
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from ssl_imwa import checkpoint
from ssl_imwa.checkpoint import CorruptCheckpoint, load_checkpoint, save_atomic
from ssl_imwa.rng import rng_state

FINGERPRINT = {"seed": 0}


def _payload(scale: float = 1.0) -> dict[str, Any]:
    weights = torch.arange(4096, dtype=torch.float32) * scale + 0.5
    return {"format_version": checkpoint.FORMAT_VERSION, "fingerprint": dict(FINGERPRINT),
            "progress": {"episode": 0, "replica_steps": {0: 7}},
            "replicas": [{"model": {"w": weights, "bf16": weights[:8].to(torch.bfloat16)}, "optimizer": {"state": {}}}],
            "run_state": {"rng": {"numpy": rng_state(torch.device("cpu"))["numpy"], "python": (3, (1, 2), None)}}}


def flip_a_tensor_byte(path: Path, tensor: torch.Tensor) -> None:
    """Damage one byte inside `tensor`'s stored bytes, leaving the zip container readable."""
    raw = bytearray(path.read_bytes())
    offset = bytes(raw).find(tensor.numpy().tobytes())
    assert offset >= 0, "the tensor's bytes must be stored verbatim"
    raw[offset + 5] ^= 0x40
    path.write_bytes(bytes(raw))


def test_a_flipped_byte_inside_a_tensor_is_detected(tmp_path: Path) -> None:
    path = tmp_path / "latest.pt"
    payload = _payload()
    save_atomic(payload, path)
    loaded = load_checkpoint(path, FINGERPRINT)
    assert torch.equal(loaded["replicas"][0]["model"]["w"], payload["replicas"][0]["model"]["w"])
    flip_a_tensor_byte(path, payload["replicas"][0]["model"]["w"])
    # torch itself loads the damaged file without complaint: only the digest tells
    assert not torch.equal(checkpoint.unpack_tensors(torch.load(path, weights_only=True))["replicas"][0]["model"]["w"],
                           payload["replicas"][0]["model"]["w"])
    with pytest.raises(CorruptCheckpoint, match="latest.pt is corrupt: its contents do not match the digest"):
        load_checkpoint(path, FINGERPRINT)


def test_changed_metadata_is_detected(tmp_path: Path) -> None:
    path = tmp_path / "latest.pt"
    save_atomic(_payload(), path)
    edited = torch.load(path, weights_only=True)
    edited["tree"]["progress"]["replica_steps"][0] = 8
    torch.save(edited, path)
    with pytest.raises(CorruptCheckpoint, match="do not match the digest"):
        load_checkpoint(path, FINGERPRINT)


def test_the_digest_depends_on_values_dtypes_and_structure() -> None:
    base = checkpoint.contents_digest(_payload())
    assert checkpoint.contents_digest(_payload()) == base
    assert checkpoint.contents_digest(_payload(scale=1.0 + 2 ** -20)) != base
    as_int = _payload()
    as_int["progress"]["episode"] = 0.0  # 0 and 0.0 pickle differently: the digest must tell them apart
    assert checkpoint.contents_digest(as_int) != base
    with pytest.raises(TypeError, match="holds a builtins.object; a checkpoint holds only tensors"):
        checkpoint.contents_digest({"object": object()})
    with pytest.raises(TypeError, match="holds a numpy.ndarray"):
        checkpoint.contents_digest({"state": np.zeros(3)})


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS])
def test_a_full_or_read_only_disk_is_named_and_keeps_the_previous_checkpoint(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int) -> None:
    path = tmp_path / "latest.pt"
    save_atomic(_payload(), path)

    def write_half_then_fail(obj: Any, stream: Any) -> None:
        stream.write(b"x" * 1000)
        raise OSError(code, "device says no")

    monkeypatch.setattr(checkpoint.torch, "save", write_half_then_fail)
    with pytest.raises(OSError) as caught:
        save_atomic(_payload(scale=2.0), path)
    assert caught.value.errno == code
    message = str(caught.value)
    assert str(path) in message and errno.errorcode[code] in message and "still holds the previous checkpoint" in message
    assert "\n" not in message
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(path, FINGERPRINT)["replicas"][0]["model"]["w"],
                       _payload()["replicas"][0]["model"]["w"])
    assert [entry.name for entry in tmp_path.iterdir()] == ["latest.pt"], "the half-written temporary is removed"


def test_a_bug_while_writing_is_not_dressed_up_as_a_storage_fault(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(obj: Any, stream: Any) -> None:
        raise OSError(errno.EBADF, "bad file descriptor")

    monkeypatch.setattr(checkpoint.torch, "save", broken)
    with pytest.raises(OSError, match="bad file descriptor"):
        save_atomic(_payload(), tmp_path / "latest.pt")
    assert list(tmp_path.iterdir()) == []


def test_a_checkpoint_gets_the_mode_the_umask_gives_any_file(tmp_path: Path) -> None:
    previous = os.umask(0o027)
    try:
        save_atomic(_payload(), tmp_path / "latest.pt")
    finally:
        os.umask(previous)
    assert (tmp_path / "latest.pt").stat().st_mode & 0o777 == 0o640  # was 0600: a labmate could not read it


def test_each_part_of_a_replica_is_packed_into_its_own_storages(tmp_path: Path) -> None:
    """Few buffers make the weights-only load fast; one part never shares a buffer with another,
    so a restored optimizer that keeps its momentum buffers does not keep the student's weights alive."""
    payload = _payload()
    payload["replicas"][0]["optimizer"] = {"state": {0: {"momentum_buffer": torch.ones(3)},
                                                     1: {"momentum_buffer": torch.zeros(2, 2)}}, "param_groups": []}
    save_atomic(payload, tmp_path / "latest.pt")
    loaded = load_checkpoint(tmp_path / "latest.pt", FINGERPRINT)
    storage = lambda tensor: tensor.untyped_storage().data_ptr()
    model, momentum = loaded["replicas"][0]["model"], loaded["replicas"][0]["optimizer"]["state"]
    assert storage(momentum[0]["momentum_buffer"]) == storage(momentum[1]["momentum_buffer"])
    assert torch.equal(momentum[1]["momentum_buffer"], torch.zeros(2, 2))
    assert storage(model["w"]) != storage(momentum[0]["momentum_buffer"])
    assert momentum[0]["momentum_buffer"].untyped_storage().nbytes() == (3 + 4) * 4
    assert torch.equal(model["bf16"], payload["replicas"][0]["model"]["bf16"]) and model["bf16"].dtype == torch.bfloat16


def test_the_flat_layout_gives_back_every_value_shape_dtype_and_container(tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(3)
    payload = {"format_version": checkpoint.FORMAT_VERSION, "fingerprint": dict(FINGERPRINT),
               "progress": {"episode": 2, "replica_steps": {0: 7, 1: 7}},
               "replicas": [{"model": OrderedDict(w=torch.randn(3, 4).t(), scalar=torch.tensor(2.5),
                                                  empty=torch.zeros(0, 5), steps=torch.tensor([1, 2], dtype=torch.int64))},
                            {"model": OrderedDict(half=torch.randn(6).half(), mask=torch.tensor([True, False]))}],
               "run_state": {"generator": generator.get_state(), "nested": [None, (1, "a", [torch.ones(2)]), 0.5]}}
    save_atomic(payload, tmp_path / "latest.pt")
    loaded = load_checkpoint(tmp_path / "latest.pt", FINGERPRINT)
    assert checkpoint.contents_digest(loaded) == checkpoint.contents_digest(payload)
    assert type(loaded["replicas"][0]["model"]) is OrderedDict and list(loaded["replicas"][1]["model"]) == ["half", "mask"]
    assert type(loaded["run_state"]["nested"][1]) is tuple and loaded["progress"]["replica_steps"] == {0: 7, 1: 7}
    restored = torch.Generator().set_state(loaded["run_state"]["generator"])  # an RNG state keeps its own storage
    assert torch.equal(torch.rand(4, generator=restored), torch.rand(4, generator=generator))
    stored = torch.load(tmp_path / "latest.pt", weights_only=True)
    assert len(stored["tensors"]["buffers"]) == 5  # per part and dtype: float, int64; half, bool; the ones
    stored["tensors"]["shapes"] = stored["tensors"]["shapes"][:-2]
    stored[checkpoint.DIGEST_KEY] = checkpoint.contents_digest({k: v for k, v in stored.items()
                                                                if k != checkpoint.DIGEST_KEY})
    torch.save(stored, tmp_path / "latest.pt")
    with pytest.raises(CorruptCheckpoint, match="latest.pt is not an ssl-imwa checkpoint: its tensors cannot be rebuilt"):
        load_checkpoint(tmp_path / "latest.pt", FINGERPRINT)


def _enforce_fail_on_write(monkeypatch: pytest.MonkeyPatch) -> None:
    """What torch.save raises on a full disk when it writes to a stream: the stream's OSError is
    the context of an `[enforce fail at inline_container.cc]` RuntimeError."""
    def full_disk(obj: Any, stream: Any) -> None:
        stream.write(b"PK\x03\x04")
        try:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598") from None

    monkeypatch.setattr(checkpoint.torch, "save", full_disk)


@pytest.mark.parametrize("disk", ["tmpfs", "injected"])
def test_a_full_disk_as_torch_reports_it_is_named_and_leaves_no_temporary(
        disk: str, small_filesystem: Path | None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if disk == "tmpfs" and small_filesystem is None:
        pytest.skip("no tmpfs can be mounted here (needs root and mount permission); the injected case runs")
    folder = small_filesystem if disk == "tmpfs" else tmp_path / "disk"
    small = {**_payload(), "replicas": []}
    save_atomic(small, folder / "latest.pt")
    big = {**_payload(), "replicas": [{"model": {"w": torch.randn(1_000_000)}}]}   # 4 MB on a 1.6 MB disk
    if disk == "injected":
        _enforce_fail_on_write(monkeypatch)
    for name, kept in (("latest.pt", "still holds the previous checkpoint"), ("merge_001.pt", "was not written")):
        with pytest.raises(OSError) as caught:
            save_atomic(big, folder / name)
        message = str(caught.value)
        assert caught.value.errno == errno.ENOSPC and "ENOSPC" in message and "\n" not in message
        assert f"cannot write checkpoint {folder / name}: " in message and kept in message
    monkeypatch.undo()
    assert sorted(entry.name for entry in folder.iterdir()) == ["latest.pt"], "no half-written temporary is left"
    assert load_checkpoint(folder / "latest.pt", FINGERPRINT)["progress"] == small["progress"]


@pytest.mark.parametrize("content", [b"not a checkpoint", b"xyz", b"PK\x03\x04 half a zip"])
def test_random_bytes_are_corrupt_not_unsafe_in_one_line(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "latest.pt").write_bytes(content)
    with pytest.raises(CorruptCheckpoint, match="latest.pt is corrupt or not a torch file") as caught:
        load_checkpoint(tmp_path / "latest.pt", FINGERPRINT)
    assert "\n" not in str(caught.value)
