"""Cross-host agreement of the collator, and the errors that stop the data.

With several processes every host must leave each step with the same decision, or the ones that
carry on wait forever in a collective. One allgather per step carries each host's buckets and a
status (ok / error / end of data) with the error's text: the buckets are max-reduced, an error
anywhere is raised on every host naming the host, and an end of data anywhere ends it everywhere.
"""
from __future__ import annotations

import collections

import numpy as np

OK, ERROR, END = 0, 1, 2
MSG_BYTES = 240  # of each host's error text carried in the gather


class HostDataError(RuntimeError):
    """The data pipeline failed on some host: raised on every host, naming the failed ones."""


class NoUsableDataError(RuntimeError):
    """The source yields only skipped records: raised instead of spinning or ending empty."""


def no_usable_message(what: str, skipped: collections.Counter, examples: dict) -> str:
    """`what`, then the top skip reasons with counts and an example (record id: detail) each."""
    top = "; ".join(f"{r} x{n} (e.g. {examples.get(r, '?')})" for r, n in skipped.most_common(3))
    return (f"{what}: {top}. Check data.path and data.image_folder "
            "(`python -m fusion_jax.data check` reports every record).")


def encode_row(buckets: tuple[int, int], failure: BaseException | None) -> np.ndarray:
    """[status, seq_len, instruct_len, error text as bytes...] of this host."""
    row = np.zeros(3 + MSG_BYTES, np.int32)
    if failure is None:
        row[1:3] = buckets
    elif isinstance(failure, StopIteration):
        row[0] = END
    else:
        row[0] = ERROR
        msg = f"{type(failure).__name__}: {failure}".encode()[:MSG_BYTES]
        row[3:3 + len(msg)] = np.frombuffer(msg, np.uint8)
    return row


def _text(codes: np.ndarray) -> str:
    return bytes(codes.astype(np.uint8)).rstrip(b"\0").decode(errors="replace")


def resolve(rows: np.ndarray, step: int) -> tuple[int, int] | None:
    """Every host's rows -> the agreed buckets, None when some host's data ended, or HostDataError."""
    rows = np.asarray(rows).reshape(-1, 3 + MSG_BYTES)
    bad = np.nonzero(rows[:, 0] == ERROR)[0]
    if bad.size:
        msgs = "; ".join(f"process {i}: {_text(rows[i, 3:])}" for i in bad)
        raise HostDataError(f"data pipeline failed at step {step} on {bad.size} of {len(rows)} processes: {msgs}")
    if (rows[:, 0] == END).any():
        return None
    seq_len, ins_len = rows[:, 1:3].max(0)
    return int(seq_len), int(ins_len)


def agree(buckets: tuple[int, int], failure: BaseException | None, step: int) -> tuple[int, int] | None:
    """One allgather across processes; see `resolve`."""
    from jax.experimental import multihost_utils
    rows = multihost_utils.process_allgather(encode_row(buckets, failure))
    return resolve(rows, step)
