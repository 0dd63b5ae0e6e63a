"""rlhf_jax.data: formats, sources (JSONL, Parquet, TFDS), tokenisation, packing, batching.

Batch layouts are fixed in docs/DESIGN.md ("Data"). Typical use::

    tok = load_tokenizer("path/to/tokenizer")
    it = sft_batches("train.jsonl", tok, batch_size=8, seq_len=512, seed=0,
                     host_id=jax.process_index(), num_hosts=jax.process_count())
    batch = next(it); ckpt["data"] = it.state(); ...; it.restore(ckpt["data"])
    metrics.update(it.stats.as_metrics())

Modules, lowest first (each imports only those before it): ``errors``, ``batching``, ``formats``,
``tokenize``, ``sources`` (JSONL, Parquet, TFDS readers), ``iterators`` (``DataIterator``,
``DataConfig``, ``make_iterator``), ``tfds_io`` (TFDS builders and conversion), ``cli``.
``tensorflow_datasets`` is a required dependency and is imported with this package (no TensorFlow).
"""
from rlhf_jax.data.batching import (fit_bucket, length_buckets, preference_batch, prompt_batch,
                                    ranking_batch, sft_batch)
from rlhf_jax.data.errors import DataError, DataStats, Location
from rlhf_jax.data.formats import (FORMATS, detect_format, parse_field_map, parse_record,
                                   split_shared_prefix)
from rlhf_jax.data.iterators import (DataConfig, DataIterator, PrefetchIterator, epoch_order, host_rows,
                                     make_iterator, preference_batches, prompt_batches, ranking_batches,
                                     read_records, sft_batches)
from rlhf_jax.data.sources import (ConcatSource, JsonlSource, MemorySource, ParquetSource,
                                   RecordSource, TfdsSource, open_source)
from rlhf_jax.data.tfds_io import (FEATURE_KINDS, RecordsBuilder, files_to_tfds, infer_features_spec,
                                   write_tfds_dataset)
from rlhf_jax.data.tokenize import (TRUNCATION_POLICIES, Encoder, TokenizeOptions, load_tokenizer,
                                    normalized_ranks, tokenize_record)

__all__ = [
    "DataError", "DataStats", "Location", "FORMATS", "detect_format", "parse_record",
    "parse_field_map", "split_shared_prefix", "RecordSource", "JsonlSource", "ParquetSource",
    "MemorySource", "ConcatSource", "open_source", "TRUNCATION_POLICIES", "TokenizeOptions",
    "Encoder", "load_tokenizer", "tokenize_record", "normalized_ranks", "sft_batch",
    "preference_batch", "ranking_batch", "prompt_batch", "length_buckets", "fit_bucket",
    "DataIterator", "PrefetchIterator", "DataConfig", "make_iterator", "sft_batches", "preference_batches",
    "ranking_batches", "prompt_batches", "read_records", "epoch_order", "host_rows",
    "TfdsSource", "RecordsBuilder", "write_tfds_dataset", "files_to_tfds", "infer_features_spec",
    "FEATURE_KINDS",
]
