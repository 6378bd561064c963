"""Training data: the grain pipeline for a config, and the offline synthesized set for `tiny`.

`prepare_synth(workdir, synth, ...)` synthesizes the set (cached in WORKDIR/data) and trains a byte-level
BPE tokenizer on its text (saved in WORKDIR/tokenizer, which evaluation reuses).
"""
from __future__ import annotations

import glob
import json
import os
import shutil

from fusion_jax.data.tokenizer import train_bpe, write_tokenizer_folder
from fusion_jax.synth.pipeline import SynthConfig


def _system_text(template: str | None) -> str:
    """The template's system message without its special tags (those are added tokens)."""
    if not template:
        return ""
    import re

    from fusion_jax.data.templates import get_template
    return re.sub(r"<\|[^|>]*\|>|<\|[^>]*>", " ", get_template(template).system).strip()


def _synth_texts(data_dir: str, template: str | None = None):
    system = _system_text(template)
    for fp in sorted(glob.glob(os.path.join(data_dir, "train", "*.json"))):
        with open(fp) as f:
            for rec in json.load(f):
                if system:  # every sample starts with it: worth whole-word tokens
                    yield system
                for turn in rec["conversations"]:
                    yield turn["value"].replace("<image>", "")
    qf = os.path.join(data_dir, "eval", "questions.jsonl")
    if os.path.isfile(qf):
        with open(qf) as f:
            for line in f:
                yield json.loads(line)["text"]


def train_tokenizer(data_dir: str, out: str, vocab_size: int = 512, template: str | None = None) -> str:
    """Byte-level BPE over the synthesized texts (and `template`'s system message, once per
    training sample), saved as an HF tokenizer folder."""
    tmp = out + ".tmp"  # a half-written folder never looks trained
    write_tokenizer_folder(train_bpe(_synth_texts(data_dir, template), vocab_size), tmp, add_bos=True)
    if os.path.isdir(out):
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def prepare_synth(workdir: str, synth: SynthConfig, *, template: str, tokenizer_vocab_size: int,
                  log=print) -> tuple[str, str, str]:
    """(mixture_yaml, image_folder, tokenizer_dir) of the synthesized set `synth`, with a tokenizer
    trained on its text for `template`.

    Process 0 synthesizes; with several processes the others wait at a barrier.
    """
    import jax
    data_dir = os.path.join(workdir, "data")
    tok_dir = os.path.join(workdir, "tokenizer")
    if jax.process_index() == 0:
        from fusion_jax.synth import generate_dataset
        s = generate_dataset(data_dir, synth)
        log(f"synth data: {data_dir} ({'cached' if s.get('cached') else 'generated'})")
        if not os.path.isfile(os.path.join(tok_dir, "tokenizer.json")):
            train_tokenizer(data_dir, tok_dir, tokenizer_vocab_size, template)
            log(f"tokenizer: trained on the synthesized text -> {tok_dir}")
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("fusion_synth_ready")
    return os.path.join(data_dir, "mixture.yaml"), data_dir, tok_dir


def build_iterator(dc, model_cfg, tokenizer, *, per_process_batch: int, seed: int):
    """The grain pipeline (fusion_jax.data.pipeline) as a checkpointable iterator of numpy batches."""
    from fusion_jax.data.pipeline import DataIterator, PipelineConfig, build_dataset, open_source
    from fusion_jax.data.sample import SampleConfig, SampleProcessor
    scfg = SampleConfig(template=dc.template, image_size=model_cfg.vision.image_size,
                        num_image_tokens=model_cfg.num_image_tokens, max_length=int(dc.max_length),
                        query_lens=tuple(model_cfg.query_len), max_questions=int(dc.max_questions),
                        max_instruct_len=int(dc.max_instruct_len))
    proc = SampleProcessor(tokenizer, scfg, image_folder=dc.image_folder or None)
    src = open_source(dc.path, image_folder=dc.image_folder or None, seed=seed)
    pcfg = PipelineConfig(batch_size=per_process_batch, seed=seed, order=dc.order,
                          seq_buckets=tuple(dc.seq_buckets),
                          instruct_buckets=tuple(dc.instruct_buckets) if dc.instruct_buckets else None,
                          worker_count=int(dc.worker_count))
    return DataIterator(build_dataset(src, proc, pcfg))
