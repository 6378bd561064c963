"""grain pipeline: mixture -> seeded global order -> per-process shard -> samples -> fixed-shape batches.

    source (JSON mixture or prepared ArrayRecord)
      -> order: seeded global shuffle per epoch, or the reference's modality/length grouping
      -> repeat -> shard [process_index::process_count]
      -> map(SampleProcessor)                          (record -> sample | Skipped)
      -> _SkipBatch: B usable samples, skips counted   (runs in grain workers)
      -> mp_prefetch(worker_count)
      -> _Collate: query_len drawn per step, buckets, build_layout, running skip totals
                                                       (main process; its state is checkpointed)
Every process draws the same query_len for the same step (seed, step), and with several
processes the seq/instruct buckets are max-reduced across hosts so global arrays line up; that
same agreement carries each host's error, so a failure anywhere is raised everywhere (hosts.py).
A source whose records are all skipped raises NoUsableDataError (after max_consecutive_skips
in a row, or at the end of finite data) instead of spinning forever.
"""
from __future__ import annotations

import bisect
import collections
import dataclasses
import sys
from collections.abc import Sequence

import grain
import numpy as np

from fusion_jax import paths
from fusion_jax.data import hosts
from fusion_jax.data.hosts import HostDataError, NoUsableDataError
from fusion_jax.data.records import InputError, JsonRecordSource
from fusion_jax.data.sample import SampleProcessor, Skipped

Order = str  # "shuffle" | "sequential" | "length_grouped"


@dataclasses.dataclass
class PipelineConfig:
    batch_size: int                               # per process
    seed: int = 0
    num_epochs: int | None = None                 # None: repeat forever
    order: Order = "shuffle"
    seq_buckets: tuple[int, ...] = (1024, 2048, 4096)
    instruct_buckets: tuple[int, ...] | None = None  # default: powers of two up to max_instruct_len
    worker_count: int = 0
    worker_buffer_size: int = 2
    read_threads: int = 1                         # grain map threads per worker (PIL releases the GIL)
    read_buffer_size: int = 16
    process_index: int | None = None              # default: jax.process_index()
    process_count: int | None = None
    max_consecutive_skips: int = 1000             # skipped records in a row before NoUsableDataError


def open_source(path: str, *, image_folder: str | None = None, seed: int = 0):
    """A JSON/JSONL/YAML mixture, or a dataset directory written by `prepare` (tfds ArrayRecord)."""
    if paths.isdir(path):
        from fusion_jax.data.tfds_builder import open_prepared
        return open_prepared(path)
    return JsonRecordSource.from_path(path, image_folder=image_folder, seed=seed)


# ----------------------------------------------------------------------------- ordering

def length_grouped_indices(lengths: np.ndarray, megabatch: int, rng: np.random.Generator) -> np.ndarray:
    """fusion_trainer.get_length_grouped_indices without the per-rank split: shuffle, then sort
    each megabatch by length (longest first)."""
    idx = rng.permutation(len(lengths))
    out = [sorted(idx[i:i + megabatch].tolist(), key=lambda j: -lengths[j])
           for i in range(0, len(idx), megabatch)]
    return np.asarray([j for mb in out for j in mb], np.int64)


def modality_length_grouped_indices(lengths: np.ndarray, megabatch: int, rng: np.random.Generator):
    """fusion_trainer.get_modality_length_grouped_indices: image (>0) and text-only (<0) samples in
    separate megabatches, megabatches shuffled, the two leftovers merged into a last one."""
    lengths = np.asarray(lengths)
    if (lengths > 0).all() or (lengths < 0).all():
        return length_grouped_indices(np.abs(lengths), megabatch, rng)
    mm = np.nonzero(lengths > 0)[0]
    lang = np.nonzero(lengths < 0)[0]
    mm_s = mm[length_grouped_indices(lengths[mm], megabatch, rng)]
    lang_s = lang[length_grouped_indices(-lengths[lang], megabatch, rng)]
    mm_mb = [mm_s[i:i + megabatch] for i in range(0, len(mm_s), megabatch)]
    lang_mb = [lang_s[i:i + megabatch] for i in range(0, len(lang_s), megabatch)]
    extra = np.sort(np.concatenate([mm_mb[-1], lang_mb[-1]]))
    mbs = mm_mb[:-1] + lang_mb[:-1]
    mbs = [mbs[i] for i in rng.permutation(len(mbs))] + ([extra] if len(extra) else [])
    return np.concatenate(mbs).astype(np.int64)


class _EpochOrderMapDataset(grain.MapDataset):
    """Index i -> parent[order(epoch)[i % n]] with a per-epoch order derived from (seed, epoch)."""

    def __init__(self, parent: grain.MapDataset, lengths: np.ndarray, megabatch: int, seed: int,
                 num_epochs: int | None):
        super().__init__(parent)
        self._n = len(parent)
        self._lengths, self._mb, self._seed = np.asarray(lengths), megabatch, seed
        self._len = sys.maxsize if num_epochs is None else self._n * num_epochs
        self._cache: tuple[int, np.ndarray] | None = None

    def __len__(self):
        return self._len if self._n else 0

    def _order(self, epoch: int) -> np.ndarray:
        if self._cache is None or self._cache[0] != epoch:
            rng = np.random.default_rng([self._seed, epoch])
            self._cache = (epoch, modality_length_grouped_indices(self._lengths, self._mb, rng))
        return self._cache[1]

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        epoch, j = divmod(index, self._n)
        return self._parent[int(self._order(epoch)[j])]

    def __str__(self):
        return f"EpochOrderMapDataset(megabatch={self._mb}, seed={self._seed})"


# ----------------------------------------------------------------------------- worker-side batching

class _SkipBatchIterator(grain.DatasetIterator):
    def __init__(self, parent, batch_size: int, max_consecutive_skips: int):
        super().__init__(parent)
        self._bs, self._max_skips = batch_size, max_consecutive_skips

    def __next__(self):
        samples, skipped, examples, repairs = [], collections.Counter(), {}, collections.Counter()
        run, details = collections.Counter(), {}  # skips since the last usable sample
        while len(samples) < self._bs:
            try:
                x = next(self._parent)
            except StopIteration:
                if not samples and not skipped:
                    raise
                # End of data: hand the counts of the incomplete batch on, so nothing goes uncounted.
                return {"tail": True, "dropped_remainder": len(samples), "skipped": dict(skipped),
                        "skipped_examples": examples, "repaired": dict(repairs)}
            if isinstance(x, Skipped):
                skipped[x.reason] += 1
                ex = examples.setdefault(x.reason, [])
                if len(ex) < 5:
                    ex.append(x.id)
                self._count_run(run, details, x)
                continue
            run.clear()
            samples.append(x)
            repairs.update(x["repairs"])
        return {
            "input_ids": [s["input_ids"] for s in samples],
            "labels": [s["labels"] for s in samples],
            "instructs": [s["instructs"] for s in samples],
            "images": np.stack([s["images"] for s in samples]),
            "has_image": np.asarray([s["has_image"] for s in samples], bool),
            "ids": [s["id"] for s in samples],
            "skipped": dict(skipped), "skipped_examples": examples, "repaired": dict(repairs),
        }

    def _count_run(self, run: collections.Counter, details: dict, x: Skipped):
        """Repeat makes the stream endless: without this, a source of only bad records spins forever."""
        run[x.reason] += 1
        details.setdefault(x.reason, f"{x.id}: {x.detail}"[:200])
        if run.total() >= self._max_skips:
            raise NoUsableDataError(hosts.no_usable_message(
                f"no usable record in {run.total()} records in a row (max_consecutive_skips)", run, details))

    def get_state(self):
        return self._parent.get_state()

    def set_state(self, state):
        self._parent.set_state(state)


class _SkipBatchIterDataset(grain.IterDataset):
    def __init__(self, parent, batch_size: int, max_consecutive_skips: int):
        super().__init__(parent)
        self._bs, self._max_skips = batch_size, max_consecutive_skips

    def __iter__(self):
        return _SkipBatchIterator(self._parent.__iter__(), self._bs, self._max_skips)


# ----------------------------------------------------------------------------- collation

def default_instruct_buckets(max_len: int) -> tuple[int, ...]:
    b, out = 16, []
    while b < max_len:
        out.append(b)
        b *= 2
    return tuple(out) + (max_len,)


def _bucket(buckets: Sequence[int], need: int) -> int:
    i = bisect.bisect_left(buckets, need)
    return buckets[min(i, len(buckets) - 1)]


class BatchCollator:
    """Ragged samples -> fixed-shape arrays via fusion_jax.layout.build_layout.

    sync_across_processes: the iterator agrees every step's buckets (and any error) across hosts
    before laying a batch out (hosts.agree); a direct call lays out this host's batch alone."""

    def __init__(self, *, num_image_tokens: int, query_lens: Sequence[int], max_questions: int,
                 max_length: int, seq_buckets: Sequence[int], instruct_buckets: Sequence[int],
                 pad_id: int = 0, seed: int = 0, sync_across_processes: bool = False):
        self.P, self.query_lens, self.L = num_image_tokens, tuple(query_lens), max_questions
        self.max_length = max_length
        self.seq_buckets = tuple(sorted({b for b in seq_buckets if b < max_length} | {max_length}))
        self.instruct_buckets = tuple(sorted(set(instruct_buckets)))
        self.pad_id, self.seed, self.sync = pad_id, seed, sync_across_processes

    def query_len(self, step: int) -> int:
        rng = np.random.default_rng([self.seed, 0x51, step])
        return int(self.query_lens[rng.integers(len(self.query_lens))])

    def buckets(self, raw: dict, step: int) -> tuple[int, int]:
        """This host's (seq_len, instruct_len) buckets for the batch."""
        from fusion_jax.layout import spliced_length
        q = self.query_len(step)
        need = max(spliced_length(x, num_image_tokens=self.P, query_len=q) for x in raw["input_ids"])
        seq_len = _bucket(self.seq_buckets, min(need, self.max_length))
        ins_need = max(max(len(x) for x in raw["instructs"]), 1)
        ins_len = _bucket(self.instruct_buckets, ins_need)
        if ins_need > ins_len:
            raise ValueError(f"instructs of {ins_need} tokens exceed the largest bucket {ins_len}")
        return seq_len, ins_len

    def __call__(self, raw: dict, step: int, buckets: tuple[int, int] | None = None) -> dict:
        """The batch laid out at `buckets` (default: this host's own, see `buckets`)."""
        from fusion_jax.layout import build_layout
        q = self.query_len(step)
        seq_len, ins_len = buckets or self.buckets(raw, step)
        out = build_layout(raw["input_ids"], raw["labels"], raw["instructs"], num_image_tokens=self.P,
                           query_len=q, max_questions=self.L, seq_len=seq_len, instruct_len=ins_len,
                           pad_id=self.pad_id, max_length=min(self.max_length, seq_len))
        out["images"] = raw["images"]
        out["query_len"] = q
        out["ids"] = raw["ids"]
        return out


class _CollateIterator(grain.DatasetIterator):
    def __init__(self, parent, collator: BatchCollator, batch_size: int):
        super().__init__(parent)
        self._collate, self._bs = collator, batch_size
        self._step = 0
        self.records = 0  # consumed: used + skipped + dropped remainders
        self.skipped = collections.Counter()
        self.repaired = collections.Counter()
        self.skipped_examples: dict[str, list[str]] = collections.defaultdict(list)
        self.dropped_remainder = 0  # usable samples of an incomplete last batch (finite epochs)

    def _count(self, raw):
        self.records += sum(raw["skipped"].values()) + (raw["dropped_remainder"] if raw.get("tail")
                                                         else len(raw["ids"]))
        self.dropped_remainder += raw.get("dropped_remainder", 0)
        self.skipped.update(raw["skipped"])
        self.repaired.update(raw["repaired"])
        for r, rids in raw["skipped_examples"].items():
            self.skipped_examples[r].extend(rids[:5 - len(self.skipped_examples[r])])

    def _next_raw(self) -> dict:
        try:
            raw = next(self._parent)
            while raw.get("tail"):  # end of a worker's data: counts only, no batch
                self._count(raw)
                raw = next(self._parent)
        except StopIteration:
            if self._step == 0 and self.skipped and not self.dropped_remainder:
                examples = {r: ", ".join(v) for r, v in self.skipped_examples.items()}
                raise NoUsableDataError(hosts.no_usable_message(
                    f"the data ended after {self.records} records, none usable", self.skipped, examples)) from None
            raise
        return raw

    def __next__(self):
        raw, buckets, out, failure = None, None, None, None
        try:
            raw = self._next_raw()
            buckets = self._collate.buckets(raw, self._step)
            out = self._collate(raw, self._step, buckets)
        except Exception as e:  # noqa: BLE001 - with several hosts, every host must hear of it
            if not self._collate.sync:
                raise
            failure = e
        if self._collate.sync:
            out = self._agree(raw, buckets, failure, out)
        self._step += 1
        self._count(raw)
        out["skipped"] = dict(raw["skipped"])
        return out

    def _agree(self, raw, buckets, failure, out):
        """The same buckets on every host, or the same error / end of data on every host."""
        try:
            agreed = hosts.agree(buckets or (0, 0), failure, self._step)
        except HostDataError as e:
            raise e from failure
        if agreed is None:  # some host's data ended: all stop here, this host's batch dropped
            if raw is not None:
                self._count({**raw, "tail": True, "dropped_remainder": len(raw["ids"])})
            raise StopIteration
        return out if agreed == buckets else self._collate(raw, self._step, agreed)

    def get_state(self):
        return {"parent": self._parent.get_state(), "step": self._step, "records": self.records,
                "skipped": dict(self.skipped), "repaired": dict(self.repaired),
                "dropped_remainder": self.dropped_remainder}

    def set_state(self, state):
        self._parent.set_state(state["parent"])
        self._step = int(state["step"])
        self.skipped = collections.Counter(state.get("skipped", {}))
        self.repaired = collections.Counter(state.get("repaired", {}))
        self.dropped_remainder = int(state.get("dropped_remainder", 0))
        # States saved before "records" existed: every step was a full batch.
        self.records = int(state.get("records", self._step * self._bs + sum(self.skipped.values())
                                     + self.dropped_remainder))

    def stats(self) -> dict:
        return {"steps": self._step, "records": self.records, "skipped": dict(self.skipped),
                "repaired": dict(self.repaired), "dropped_remainder": self.dropped_remainder,
                "skipped_examples": dict(self.skipped_examples)}


class _CollateIterDataset(grain.IterDataset):
    def __init__(self, parent, collator: BatchCollator, batch_size: int):
        super().__init__(parent)
        self._collator, self._bs = collator, batch_size

    def __iter__(self):
        return _CollateIterator(self._parent.__iter__(), self._collator, self._bs)


# ----------------------------------------------------------------------------- assembly

def _process_index_count(cfg: PipelineConfig) -> tuple[int, int]:
    if cfg.process_index is not None and cfg.process_count is not None:
        return cfg.process_index, cfg.process_count
    import jax
    return jax.process_index(), jax.process_count()


def build_dataset(source, processor: SampleProcessor, cfg: PipelineConfig, *,
                  lengths: np.ndarray | None = None) -> grain.IterDataset:
    """The full pipeline as a grain IterDataset; `iter()` it (or use `make_iterator`)."""
    if len(source) == 0:  # would end at once (or spin, repeated): say why instead
        raise InputError("the data source has no records (check data.path and its sampling strategies)")
    pidx, pcount = _process_index_count(cfg)
    scfg = processor.cfg
    ds = grain.MapDataset.source(source)
    if cfg.order == "length_grouped":
        if lengths is None:
            lengths = source.modality_lengths()
        ds = _EpochOrderMapDataset(ds, lengths, cfg.batch_size * pcount, cfg.seed, cfg.num_epochs)
    elif cfg.order == "shuffle":
        ds = ds.shuffle(seed=cfg.seed).repeat(cfg.num_epochs)
    elif cfg.order == "sequential":
        ds = ds.repeat(cfg.num_epochs)
    else:
        raise ValueError(f"unknown order {cfg.order!r}")
    ds = ds[pidx::pcount]
    ds = ds.map(processor)
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=cfg.read_threads,
                                              prefetch_buffer_size=cfg.read_buffer_size))
    it = _SkipBatchIterDataset(it, cfg.batch_size, cfg.max_consecutive_skips)
    if cfg.worker_count > 0:
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.worker_count,
                                                         per_worker_buffer_size=cfg.worker_buffer_size))
    max_len = scfg.max_length or max(cfg.seq_buckets)
    collator = BatchCollator(
        num_image_tokens=scfg.num_image_tokens, query_lens=scfg.query_lens,
        max_questions=scfg.max_questions or 16, max_length=max_len, seq_buckets=cfg.seq_buckets,
        instruct_buckets=cfg.instruct_buckets or default_instruct_buckets(scfg.max_instruct_len or 512),
        pad_id=getattr(processor.tok, "pad_id", 0), seed=cfg.seed, sync_across_processes=pcount > 1)
    return _CollateIterDataset(it, collator, cfg.batch_size)


class DataIterator:
    """Host-local numpy batches (`fusion_jax.sharding.shard_batch` puts them on a mesh);
    get_state/set_state for Orbax."""

    def __init__(self, dataset: grain.IterDataset):
        self._it = iter(dataset)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        return next(self._it)

    @property
    def grain_iterator(self) -> grain.DatasetIterator:
        """What to pass to grain.checkpoint.CheckpointSave / CheckpointRestore."""
        return self._it

    def get_state(self):
        return self._it.get_state()

    def set_state(self, state):
        self._it.set_state(state)

    def stats(self) -> dict:
        return self._it.stats()

    def close(self):
        close = getattr(self._it, "close", None)
        if close:
            close()
