"""rlhf_jax.generation: batched sampling with a KV cache, compiled once per shape bucket."""
from rlhf_jax.generation.bucketing import bucket_length, power_of_two_buckets, left_pad_sequences, left_pad_to
from rlhf_jax.generation.decode import GenerationOutput, decode_loop
from rlhf_jax.generation.engine import check_arguments, generate
from rlhf_jax.generation.errors import GenerationArgumentError
from rlhf_jax.generation.sampling import filter_logits, sample_tokens, scale_logits
from rlhf_jax.generation.stopping import is_stop_token, normalize_stop_ids, response_mask, truncate_after_stop
from rlhf_jax.generation.text import generate_text

__all__ = [
    "GenerationArgumentError",
    "GenerationOutput",
    "check_arguments",
    "bucket_length",
    "decode_loop",
    "power_of_two_buckets",
    "filter_logits",
    "generate",
    "generate_text",
    "is_stop_token",
    "left_pad_sequences",
    "left_pad_to",
    "normalize_stop_ids",
    "response_mask",
    "sample_tokens",
    "scale_logits",
    "truncate_after_stop",
]
