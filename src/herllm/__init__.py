"""herllm: task-agnostic continual adaptation of causal language models."""

__version__ = "0.1.0"
