"""`check`: run every record through the training preprocessing and report what would be used."""
from __future__ import annotations

import collections

import numpy as np

from fusion_jax.data.sample import SampleProcessor, Skipped

MAX_EXAMPLES = 5


class Report:
    """Counts usable / skipped (by reason, with example ids) / repaired, and token lengths."""

    def __init__(self):
        self.total = 0
        self.usable = 0
        self.skipped = collections.Counter()
        self.repaired = collections.Counter()
        self.examples = collections.defaultdict(list)
        self.text_lengths: list[int] = []
        self.spliced_lengths: list[int] = []
        self.over_max_len = 0

    def add(self, out, *, spliced: int | None = None, max_len: int | None = None):
        self.total += 1
        if isinstance(out, Skipped):
            self.skipped[out.reason] += 1
            if len(self.examples[out.reason]) < MAX_EXAMPLES:
                self.examples[out.reason].append(out.id)
            return
        self.usable += 1
        for r in out["repairs"]:
            self.repaired[r] += 1
        self.text_lengths.append(int(out["input_ids"].shape[0]))
        if spliced is not None:
            self.spliced_lengths.append(spliced)
            self.over_max_len += int(max_len is not None and spliced > max_len)

    @staticmethod
    def _pct(xs):
        if not xs:
            return {}
        a = np.asarray(xs)
        return {f"p{p}": int(np.percentile(a, p)) for p in (50, 90, 99)} | {"max": int(a.max()),
                                                                           "mean": round(float(a.mean()), 1)}

    def to_dict(self) -> dict:
        return {"total": self.total, "usable": self.usable, "skipped": dict(sorted(self.skipped.items())),
                "skipped_fraction": round(sum(self.skipped.values()) / max(self.total, 1), 4),
                "skipped_examples": {k: v for k, v in sorted(self.examples.items())},
                "repaired": dict(sorted(self.repaired.items())),
                "text_tokens": self._pct(self.text_lengths),
                "spliced_tokens_max_query_len": self._pct(self.spliced_lengths),
                "over_max_len": self.over_max_len}

    def format(self) -> str:
        d = self.to_dict()
        lines = [f"total records : {d['total']}", f"usable        : {d['usable']}",
                 f"skipped       : {sum(self.skipped.values())} ({d['skipped_fraction']:.1%}; training stops "
                 "above data.max_skip_fraction)"]
        if self.total and not self.usable:
            lines.append("no usable record: training would stop at once (NoUsableDataError)")
        for reason, n in d["skipped"].items():
            lines.append(f"  {reason:<20} {n:>8}   e.g. {', '.join(d['skipped_examples'][reason])}")
        if d["repaired"]:
            lines.append("repaired (kept):")
            lines += [f"  {r:<26} {n:>8}" for r, n in d["repaired"].items()]
        for name in ("text_tokens", "spliced_tokens_max_query_len"):
            if d[name]:
                lines.append(f"{name}: " + "  ".join(f"{k}={v}" for k, v in d[name].items()))
        lines.append(f"longer than max_len (truncated): {d['over_max_len']}")
        return "\n".join(lines)


def run_check(source, processor: SampleProcessor, *, limit: int | None = None, progress: bool = False) -> Report:
    from fusion_jax.layout import spliced_length
    cfg = processor.cfg
    rep = Report()
    n = len(source) if limit is None else min(limit, len(source))
    it = range(n)
    if progress:
        from tqdm import tqdm
        it = tqdm(it, desc="check", unit="rec")
    for i in it:
        out = processor(source[i])
        spliced = None
        if not isinstance(out, Skipped):
            spliced = spliced_length(out["input_ids"], num_image_tokens=cfg.num_image_tokens,
                                     query_len=max(cfg.query_lens))
        rep.add(out, spliced=spliced, max_len=cfg.max_length)
    return rep
