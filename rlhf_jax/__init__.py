"""rlhf_jax: reinforcement learning from human feedback in JAX."""
import logging as _logging

__version__ = "0.1.0"


class _NoTorchAdvice(_logging.Filter):
    """rlhf_jax uses transformers for tokenizers only, and torch is not a runtime dependency: drop the
    one advisory transformers logs at import when torch is absent ("PyTorch was not found. Models
    won't be available ..."). Every other transformers message passes."""

    def filter(self, record: _logging.LogRecord) -> bool:
        return not str(record.msg).startswith("PyTorch was not found.")


_logging.getLogger("transformers").addFilter(_NoTorchAdvice())
