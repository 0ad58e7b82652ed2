"""Typed configuration: one dataclass per concern, YAML <-> dataclass, CLI overrides.

Every field carries a docstring (the attribute docstring right below it); `herllm adapt --help`
and the error messages read them. A field's range or choices are part of its type
(`Annotated[float, Range(gt=0)]`, `Literal[...]`, or `OneOf` a registry's names) and are checked
where the section is read; unknown keys and impossible combinations raise `ConfigError` naming
the field, the value and what is allowed.

`sections` holds the dataclasses, `fields` the constraints, `io` the dict/YAML side.
"""

from herllm.config.fields import ConfigError, OneOf, Range, check_fields, check_value
from herllm.config.io import (
    apply_overrides,
    build_config,
    field_docs,
    from_dict,
    load_yaml,
    save_yaml,
    to_dict,
)
from herllm.config.sections import (
    CheckpointConfig,
    EvalConfig,
    ExpandConfig,
    KnowledgeConfig,
    LoraConfig,
    ModelConfig,
    ProtectConfig,
    ReplayConfig,
    RunConfig,
    SelectConfig,
    ShiftConfig,
    StreamConfig,
    TrainConfig,
)

__all__ = [
    "CheckpointConfig",
    "ConfigError",
    "EvalConfig",
    "ExpandConfig",
    "KnowledgeConfig",
    "LoraConfig",
    "ModelConfig",
    "OneOf",
    "ProtectConfig",
    "Range",
    "ReplayConfig",
    "RunConfig",
    "SelectConfig",
    "ShiftConfig",
    "StreamConfig",
    "TrainConfig",
    "apply_overrides",
    "build_config",
    "check_fields",
    "check_value",
    "field_docs",
    "from_dict",
    "load_yaml",
    "save_yaml",
    "to_dict",
]
