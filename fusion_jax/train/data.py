"""Training data: the grain pipeline for a config, and the offline synthesized set for `tiny`.

`prepare_synth(workdir, synth, ...)` synthesizes the set (cached in WORKDIR/data) and trains a byte-level
BPE tokenizer on its text (saved in WORKDIR/tokenizer, which evaluation reuses). A cloud workdir
(gs://): the set is synthesized into a local cache folder and uploaded to WORKDIR/data once.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile

from etils import epath

from fusion_jax import paths
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
    for fp in sorted((epath.Path(data_dir) / "train").glob("*.json")):
        for rec in json.loads(fp.read_text()):
            if system:  # every sample starts with it: worth whole-word tokens
                yield system
            for turn in rec["conversations"]:
                yield turn["value"].replace("<image>", "")
    qf = epath.Path(data_dir) / "eval" / "questions.jsonl"
    if qf.is_file():
        for line in qf.read_text().splitlines():
            if line.strip():
                yield json.loads(line)["text"]


def train_tokenizer(data_dir: str, out: str, vocab_size: int = 512, template: str | None = None) -> str:
    """Byte-level BPE over the synthesized texts (and `template`'s system message, once per
    training sample), saved as an HF tokenizer folder."""
    tok = train_bpe(_synth_texts(data_dir, template), vocab_size)
    if paths.is_url(out):  # tokenizer.json, the "trained" mark, is uploaded last
        local = write_tokenizer_folder(tok, tempfile.mkdtemp(prefix="fusion_tok_"), add_bos=True)
        files = sorted(epath.Path(local).iterdir(), key=lambda p: p.name == "tokenizer.json")
        epath.Path(out).mkdir(parents=True, exist_ok=True)
        for p in files:
            p.copy(epath.Path(out) / p.name, overwrite=True)
        return out
    tmp = epath.Path(out + ".tmp")  # a half-written folder never looks trained
    write_tokenizer_folder(tok, os.fspath(tmp), add_bos=True)
    if paths.isdir(out):
        epath.Path(out).rmtree()
    tmp.rename(out)
    return out


def _synth_into(data_dir: str, synth: SynthConfig) -> dict:
    """generate_dataset into data_dir; a cloud data_dir: into a local cache folder, uploaded once (a
    marker object written last says the upload is complete and matches the local summary)."""
    from fusion_jax.synth import generate_dataset
    if not paths.is_url(data_dir):
        return generate_dataset(data_dir, synth)
    local = os.path.join(tempfile.gettempdir(), "fusion_synth", hashlib.sha1(data_dir.encode()).hexdigest()[:16])
    s = generate_dataset(local, synth)
    summary = (epath.Path(local) / "summary.json").read_text()
    mark = epath.Path(data_dir) / ".uploaded_summary.json"
    if mark.exists() and mark.read_text() == summary:
        return {**s, "cached": True}
    paths.copy_tree(local, data_dir)
    mark.write_text(summary)
    return {**s, "cached": False}


def prepare_synth(workdir: str, synth: SynthConfig, *, template: str, tokenizer_vocab_size: int,
                  log=print) -> tuple[str, str, str]:
    """(mixture_yaml, image_folder, tokenizer_dir) of the synthesized set `synth`, with a tokenizer
    trained on its text for `template`.

    Process 0 synthesizes; with several processes the others wait at a barrier.
    """
    import jax
    data_dir = paths.join(workdir, "data")
    tok_dir = paths.join(workdir, "tokenizer")
    if jax.process_index() == 0:
        s = _synth_into(data_dir, synth)
        log(f"synth data: {data_dir} ({'cached' if s.get('cached') else 'generated'})")
        if not paths.isfile(paths.join(tok_dir, "tokenizer.json")):
            train_tokenizer(data_dir, tok_dir, tokenizer_vocab_size, template)
            log(f"tokenizer: trained on the synthesized text -> {tok_dir}")
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("fusion_synth_ready")
    return paths.join(data_dir, "mixture.yaml"), data_dir, tok_dir


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
