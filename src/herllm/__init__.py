"""herllm: task-agnostic continual adaptation of causal language models.

from herllm import Learner, build_config
cfg = build_config("my.yaml", ["stream.sources=[notes/]", "replay.ratio=0.25"])
summary = Learner(cfg).run()
"""

__version__ = "0.1.0"

from herllm.config import RunConfig, build_config  # noqa: E402
from herllm.errors import UserError  # noqa: E402
from herllm.infer.adapted import AdaptedModel  # noqa: E402
from herllm.run.learner import Learner, Summary  # noqa: E402

LearnerConfig = RunConfig

__all__ = [
    "AdaptedModel",
    "Learner",
    "LearnerConfig",
    "RunConfig",
    "Summary",
    "UserError",
    "build_config",
    "__version__",
]
