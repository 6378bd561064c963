"""Training data: the grain pipeline for a config, and the offline synthesized set for `tiny`.

`prepare_synth(workdir, dc)` synthesizes the set (cached in WORKDIR/data) and trains a byte-level
BPE tokenizer on its text (saved in WORKDIR/tokenizer, which evaluation reuses).
"""
from __future__ import annotations

import glob
import json
import os

import numpy as np

from fusion_jax.data.testing import SPECIAL


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
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_synth_texts(data_dir, template), trainer=trainer)
    tmp = out + ".tmp"
    from fusion_jax.data.tokenizer import write_tokenizer_folder
    write_tokenizer_folder(tok, tmp, add_bos=True)
    if os.path.isdir(out):
        import shutil
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def prepare_synth(workdir: str, dc, log=print) -> tuple[str, str, str]:
    """(mixture_yaml, image_folder, tokenizer_dir) of the synthesized set for config.data `dc`.

    Process 0 synthesizes; with several processes the others wait on a marker file.
    """
    import jax
    data_dir = os.path.join(workdir, "data")
    tok_dir = os.path.join(workdir, "tokenizer")
    if jax.process_index() == 0:
        from fusion_jax.synth import generate_dataset
        from fusion_jax.synth.qa import SPATIAL_YESNO_FRACTION
        s = generate_dataset(data_dir, int(dc.synth_num), int(dc.synth_seed), image_size=int(dc.synth_image_size),
                             workers=int(dc.synth_workers), heldout_fraction=float(dc.synth_heldout_fraction),
                             difficulty=str(dc.synth_difficulty),
                             kinds=list(dc.synth_kinds) if dc.synth_kinds else None,
                             max_turns=int(dc.get("synth_max_turns", 0)) or None,
                             describe_fraction=float(dc.get("synth_describe_fraction", 0.0)),
                             spatial_refs=str(dc.get("synth_spatial_refs", "shape")),
                             locate_fraction=float(dc.get("synth_locate_fraction", 0.0)),
                             describe_positions=bool(dc.get("synth_describe_positions", False)),
                             spatial_order=str(dc.get("synth_spatial_order", "subject_first")),
                             mc_fraction=None if float(dc.get("synth_mc_fraction", -1.0)) < 0
                             else float(dc.synth_mc_fraction),
                             spatial_yesno_fraction=float(dc.get("synth_spatial_yesno_fraction",
                                                                 SPATIAL_YESNO_FRACTION)),
                             progress=bool(dc.get("synth_progress", False)))
        log(f"synth data: {data_dir} ({'cached' if s.get('cached') else 'generated'})")
        if not os.path.isfile(os.path.join(tok_dir, "tokenizer.json")):
            train_tokenizer(data_dir, tok_dir, int(dc.tokenizer_vocab_size), str(dc.template))
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


def to_device_batch(batch: dict, mesh) -> dict:
    """Host-local numpy batch -> global arrays sharded over data x fsdp (model keys only)."""
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from fusion_jax.train.step import BATCH_AXES, BATCH_KEYS
    out = {}
    for k in BATCH_KEYS:
        v = np.asarray(batch[k])
        sh = NamedSharding(mesh, P(BATCH_AXES, *([None] * (v.ndim - 1))))
        out[k] = jax.make_array_from_process_local_data(sh, v)
    return out
