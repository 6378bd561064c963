"""Evaluation at scale: sharded loading, per-process question shards, resumable answer files.

* `--dtype bfloat16 --mesh DATA,FSDP,TENSOR` load the checkpoint through
  `from_pretrained(mesh=, dtype=)` onto a mesh of this process's devices (parameters placed
  by `fusion_jax.sharding.RULES`), so the 8B model fits a TPU host's chips.
* Under `jax.distributed` each process answers questions i with i % process_count ==
  process_index, on its own devices; process 0 merges everything into `--out`, in question
  order, after a barrier (`--out` must be on storage every process sees: a shared disk or gs://).
* Answers are written while the run goes, as chunk files under `OUT.parts/` (each written
  to a temporary name and renamed, so a kill leaves whole chunks only); `--resume` skips the
  questions already answered in `--out` or in those chunks. The final `--out` is rewritten in
  question order, so an interrupted-and-resumed run gives the same file as an uninterrupted one.
* Bad questions are written to `OUT` with `.failures.jsonl` ({"question_id", "index" or
  "line", "reason"}); `run_questions` returns 1 when there were any, after writing the answers.
"""
from __future__ import annotations

import json
import uuid

from etils import epath

from fusion_jax.eval.runner import run_eval, write_jsonl

DTYPES = ("float32", "bfloat16")


def add_load_args(ap) -> None:
    """--dtype / --mesh (read by `load_for_eval`)."""
    ap.add_argument("--dtype", choices=DTYPES, default=None,
                    help="parameter and compute dtype (default: the checkpoint's config)")
    ap.add_argument("--mesh", default=None,
                    help="DATA,FSDP,TENSOR mesh over this process's devices, one entry may be -1 "
                         "(e.g. 1,-1,1: FSDP over all local devices); default: one device")


def add_scale_args(ap) -> None:
    """--dtype / --mesh / --resume / --flush-every (read by `load_for_eval` and `run_questions`)."""
    add_load_args(ap)
    ap.add_argument("--resume", action="store_true",
                    help="skip the questions already answered in --out (or in its OUT.parts/ chunks)")
    ap.add_argument("--flush-every", type=int, default=64,
                    help="answers per chunk written under OUT.parts/ (at most this many are redone "
                         "after a kill)")


def parse_mesh(text: str | None):
    if not text:
        return None
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise ValueError(f"--mesh {text!r}: expected three comma-separated integers, e.g. 1,-1,1") from None


def load_for_eval(args):
    """(tokenizer, model) for the generation options plus --dtype / --mesh (process-local mesh)."""
    import jax

    from fusion_jax.generate.cli import load_for_cli
    from fusion_jax.sharding import make_mesh
    shape = parse_mesh(getattr(args, "mesh", None))
    kw = {}
    if shape is not None:
        kw["mesh"] = make_mesh(shape, jax.local_devices())
    if getattr(args, "dtype", None):
        kw["dtype"] = args.dtype
        kw["compute_dtype"] = args.dtype
    return load_for_cli(args, **kw)


def _parts_dir(out) -> epath.Path:
    out = epath.Path(out)
    return out.parent / (out.name + ".parts")


def failures_path(out) -> epath.Path:
    out = epath.Path(out)
    stem = out.name[:-6] if out.name.endswith(".jsonl") else out.name
    return out.parent / (stem + ".failures.jsonl")


def _read_rows(path: epath.Path) -> list:
    """JSON lines of a file; a torn last line (no newline or not JSON) is dropped."""
    text = path.read_text()
    lines = text.split("\n")
    rows = []
    for k, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except ValueError:
            if k == len(lines) - 1:
                break
            raise ValueError(f"{path} line {k + 1}: not JSON") from None
    return rows


def answered_rows(out) -> list:
    """Answer records already written for `out`: the file itself, then every finished chunk."""
    out = epath.Path(out)
    rows = _read_rows(out) if out.exists() else []
    parts = _parts_dir(out)
    if parts.exists():
        for p in sorted(parts.glob("*.jsonl")):
            rows += _read_rows(p)
    return rows


class ChunkWriter:
    """Buffers answer records; writes them as whole chunk files under OUT.parts/."""

    def __init__(self, out, process_index: int, flush_every: int):
        self.dir = _parts_dir(out)
        self.prefix = f"p{process_index:05d}-{uuid.uuid4().hex[:8]}"
        self.flush_every, self.rows, self.seq = max(1, int(flush_every)), [], 0

    def add(self, records) -> None:
        self.rows += records
        if len(self.rows) >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        if not self.rows:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        write_jsonl(str(self.dir / f"{self.prefix}-{self.seq:06d}.jsonl"), self.rows)
        self.rows, self.seq = [], self.seq + 1


def record_key(r: dict) -> tuple:
    """An answer's identity: question_id, plus MMBench's round_id (all-rounds repeats the id)."""
    return r.get("question_id"), r.get("round_id")


def question_key(q) -> tuple | None:
    if not isinstance(q, dict):
        return None
    return q.get("question_id"), (q.get("answer_fields") or {}).get("round_id")


def merge(out, questions) -> int:
    """Rewrite `out` with the answers of `questions`, in question order; drop the chunks."""
    by_key = {}
    for r in answered_rows(out):
        by_key.setdefault(record_key(r), r)
    rows = [by_key[question_key(q)] for q in questions if question_key(q) in by_key]
    write_jsonl(str(out), rows)
    parts = _parts_dir(out)
    if parts.exists():
        parts.rmtree()
    return len(rows)


def _barrier(name: str) -> None:
    import jax
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def _shard(questions, answered: set):
    """This process's (indices, questions) not yet answered: i % process_count == process_index."""
    import jax
    n, pid = jax.process_count(), jax.process_index()
    picked = [(i, q) for i, q in enumerate(questions) if i % n == pid
              and question_key(q) not in answered]
    return [i for i, _ in picked], [q for _, q in picked]


def _start(out, resume: bool) -> set:
    """The answered question ids (resume) or a clean slate (process 0 removes old outputs)."""
    import jax
    out = epath.Path(out)
    if resume:
        return {record_key(r) for r in answered_rows(out)}
    if jax.process_index() == 0:
        for p in (out, failures_path(out)):
            if p.exists():
                p.unlink()
        if _parts_dir(out).exists():
            _parts_dir(out).rmtree()
    _barrier("fusion_jax.eval.start")
    return set()


def _gather_failures(out, failures: list) -> list:
    """Every process's failures (written beside the chunks), read by process 0 after the barrier."""
    import jax
    parts = _parts_dir(out)
    if jax.process_count() > 1:
        parts.mkdir(parents=True, exist_ok=True)
        write_jsonl(str(parts / f"failures-{jax.process_index():05d}.json"), failures)
        _barrier("fusion_jax.eval.written")
        if jax.process_index() != 0:
            return failures
        return [r for p in range(jax.process_count()) for r in _read_rows(parts / f"failures-{p:05d}.json")]
    return failures


def run_questions(args, questions, model, tokenizer, gcfg, *, model_id: str, failures=(), log=print) -> int:
    """Answer `questions` into `args.out` (resumable, sharded over processes); returns the exit status.

    `failures`: failure records found while reading (e.g. malformed lines), reported with the rest.
    """
    import jax
    out = args.out
    answered = _start(out, getattr(args, "resume", False))
    idx, mine = _shard(questions, answered)
    if answered:
        log(f"resume: {len(answered)} answered already, {len(mine)} to answer here")
    writer = ChunkWriter(out, jax.process_index(), getattr(args, "flush_every", 64))
    fails = []
    try:
        run_eval(model, tokenizer, mine, image_folder=args.image_folder, gcfg=gcfg,
                 batch_size=max(1, args.batch_size), model_id=model_id,
                 progress=not getattr(args, "no_progress", False), failures=fails,
                 on_batch=writer.add, indices=idx)
    finally:
        writer.flush()                       # whatever was answered survives an error
    fails = _gather_failures(out, fails)
    if jax.process_index() != 0:
        _barrier("fusion_jax.eval.merged")
        return 1 if fails else 0
    fails = list(failures) + fails
    n = merge(out, questions)
    _barrier("fusion_jax.eval.merged")
    if fails:
        write_jsonl(str(failures_path(out)), sorted(fails, key=lambda f: (f.get("index", -1), f.get("line", -1))))
        for f in fails:
            log(f"failed: question {f.get('question_id')!r}: {f['reason']}")
    log(f"wrote {n} answers to {out}" + (f"; {len(fails)} failed, listed in {failures_path(out)}" if fails else ""))
    return 1 if fails else 0
