"""FUSION training data: LLaVA-style records -> fixed-shape batches for the model core.

Modules
  records     JSON / JSONL / YAML mixtures, sampling strategies, conversation validation
  images      safe image loading (path, pixel limit, truncation, modes, EXIF), static_hd crops
  templates   phi_3 / llama_3 / qwen_2 / plain prompts, placeholder tokenization, labels, instructs
  tokenizer   HF tokenizer folder loaded offline with `tokenizers`
  sample      record -> sample | Skipped (shared by training, `check` and `preview`)
  pipeline    grain pipeline, buckets + build_layout collation, iterator state
  hosts       the collator's cross-host agreement (buckets, errors, end of data); the data errors
  tfds_builder  mixture -> ArrayRecord (images as bytes), read with tfds.data_source, no TensorFlow
  check / preview  the CLI's reports (`python -m fusion_jax.data check|preview|prepare`)

Typical use::

    tok = load_tokenizer(tokenizer_dir)
    proc = SampleProcessor(tok, SampleConfig(template="phi_3", max_length=4096), image_folder=images)
    ds = build_dataset(open_source("mixture.yaml"), proc, PipelineConfig(batch_size=8, seed=0))
    it = DataIterator(ds)                          # numpy batches; shard_batch puts them on a mesh
    ckpt.save(step, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it.grain_iterator)))

Known deviations from the reference (each on purpose, see the module docstrings): labels from
character spans rather than per-tokenizer length arithmetic; qwen_2 gets latent placeholders;
EXIF orientation is applied (option `exif_transpose`); truncated images are skipped rather than
grey-filled; 16-bit images are scaled rather than clipped; bad records are skipped and counted
instead of being replaced by a random other record.
"""
from fusion_jax.data.hosts import HostDataError, NoUsableDataError
from fusion_jax.data.pipeline import BatchCollator, DataIterator, PipelineConfig, build_dataset, open_source
from fusion_jax.data.records import REPAIRS, SKIP_REASONS, InputError
from fusion_jax.data.sample import SampleConfig, SampleProcessor, Skipped, StrictModeError
from fusion_jax.data.tokenizer import load_tokenizer

__all__ = ["BatchCollator", "DataIterator", "PipelineConfig", "build_dataset", "open_source",
           "HostDataError", "NoUsableDataError",
           "REPAIRS", "SKIP_REASONS", "InputError", "SampleConfig", "SampleProcessor",
           "Skipped", "StrictModeError", "load_tokenizer"]
