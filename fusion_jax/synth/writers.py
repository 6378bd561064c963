"""Stage 5: writers. Layout of an output folder (the image folder is the output folder itself)::

    mixture.yaml               training mixture; json_path relative to this file's folder
    train/synth_<kind>.json    LLaVA/FUSION records, one file per kind
    images/train/*.png         training images
    images/eval/*.png          held-out images
    eval/questions.jsonl       held-out questions, LLaVA model_vqa input format (no answers)
    eval/answers.jsonl         held-out answers, kept apart
    meta/train_scenes.jsonl    the descriptions, captions and QA specs (for debugging / analysis)
    meta/eval_scenes.jsonl
    summary.json               arguments and counts; written last (its presence marks completion)

All files are written in index order with sorted JSON keys, so the bytes do not depend on how
many worker processes produced the samples.
"""
from __future__ import annotations

import json
import os
import shutil

from .pipeline import conversation
from .qa import QAPair

MIXTURE = "mixture.yaml"
SUMMARY = "summary.json"
QUESTIONS = "eval/questions.jsonl"
ANSWERS = "eval/answers.jsonl"
OWNED = ("images", "train", "eval", "meta", MIXTURE, SUMMARY)


def _dumps(obj) -> str:
    return json.dumps(obj, sort_keys=True, ensure_ascii=False)


def train_json_relpath(kind: str) -> str:
    return f"train/synth_{kind}.json"


def clear_output(out_dir: str):
    """Remove what a previous run wrote (only the paths this writer owns)."""
    for name in OWNED:
        p = os.path.join(out_dir, name)
        if os.path.isdir(p):
            shutil.rmtree(p)
        elif os.path.exists(p):
            os.remove(p)


class DatasetWriter:
    """Streams encoded samples (``pipeline.encode_sample`` dicts) to disk, in the order given."""

    def __init__(self, out_dir: str, kinds):
        self.out_dir = out_dir
        self.kinds = tuple(kinds)
        for d in ("images/train", "images/eval", "train", "eval", "meta"):
            os.makedirs(os.path.join(out_dir, d), exist_ok=True)
        self._train = {}
        self._first = {}
        self._q = open(os.path.join(out_dir, QUESTIONS), "w", encoding="utf-8", newline="\n")
        self._a = open(os.path.join(out_dir, ANSWERS), "w", encoding="utf-8", newline="\n")
        self._meta = {s: open(os.path.join(out_dir, f"meta/{s}_scenes.jsonl"), "w", encoding="utf-8",
                              newline="\n") for s in ("train", "eval")}
        self.counts = {"train": {k: 0 for k in self.kinds}, "eval": {k: 0 for k in self.kinds}}
        self.turns = 0
        self.styles: dict = {}
        self.rejections: dict = {}
        self.attempts = 0

    def _train_file(self, kind):
        if kind not in self._train:
            f = open(os.path.join(self.out_dir, train_json_relpath(kind)), "w", encoding="utf-8", newline="\n")
            f.write("[\n")
            self._train[kind] = f
            self._first[kind] = True
        return self._train[kind]

    def add(self, s: dict):
        with open(os.path.join(self.out_dir, s["image"]), "wb") as f:
            f.write(s["png"])
        qas = [QAPair(**q) for q in s["qas"]]
        split, kind = s["split"], s["kind"]
        self.counts[split][kind] += 1
        self.attempts += s["attempts"]
        for k, v in s["rejections"].items():
            self.rejections[k] = self.rejections.get(k, 0) + v
        for q in qas:
            self.styles[q.style] = self.styles.get(q.style, 0) + 1
        meta = {"id": s["id"], "image": s["image"], "kind": kind, "scene": s["scene"],
                "caption": s["caption"], "qas": s["qas"]}
        self._meta[split].write(_dumps(meta) + "\n")
        if split == "train":
            rec = {"id": s["id"], "image": s["image"], "conversations": conversation(qas)}
            f = self._train_file(kind)
            if not self._first[kind]:
                f.write(",\n")
            self._first[kind] = False
            f.write(_dumps(rec))
            self.turns += len(qas)
        else:
            q = qas[0]
            qid = s["id"]
            self._q.write(_dumps({"question_id": qid, "image": s["image"], "text": q.question,
                                  "category": kind}) + "\n")
            ans = {"question_id": qid, "answer": q.answer, "answer_text": q.answer_text,
                   "category": kind, "qtype": q.qtype, "style": q.style, "chance": round(q.chance, 6)}
            if q.choices:
                ans["choices"] = q.choices
            self._a.write(_dumps(ans) + "\n")

    def close(self) -> dict:
        for f in self._train.values():
            f.write("\n]\n")
            f.close()
        self._q.close()
        self._a.close()
        for f in self._meta.values():
            f.close()
        kinds_written = [k for k in self.kinds if k in self._train]
        lines = ["# FUSION data mixture written by fusion_jax.synth.",
                 "# json_path is relative to the folder of this file; use that folder as --image-folder.",
                 "datasets:"]
        for k in kinds_written:
            lines.append(f"  - json_path: {train_json_relpath(k)}")
            lines.append("    sampling_strategy: all")
        if not kinds_written:
            lines[-1] = "datasets: []"
        with open(os.path.join(self.out_dir, MIXTURE), "w", encoding="utf-8", newline="\n") as f:
            f.write("\n".join(lines) + "\n")
        return {
            "train": {"samples": sum(self.counts["train"].values()), "per_kind": self.counts["train"],
                      "turns": self.turns,
                      "json": {k: train_json_relpath(k) for k in kinds_written}},
            "eval": {"questions": sum(self.counts["eval"].values()), "per_kind": self.counts["eval"],
                     "question_file": QUESTIONS, "answer_file": ANSWERS},
            "styles": dict(sorted(self.styles.items())),
            "rejections": dict(sorted(self.rejections.items())),
            "attempts": self.attempts,
            "mixture": MIXTURE,
            "image_folder": ".",
        }


def write_summary(out_dir: str, summary: dict):
    with open(os.path.join(out_dir, SUMMARY), "w", encoding="utf-8", newline="\n") as f:
        f.write(json.dumps(summary, sort_keys=True, indent=1) + "\n")


def read_summary(out_dir: str):
    p = os.path.join(out_dir, SUMMARY)
    if not os.path.exists(p):
        return None
    with open(p, encoding="utf-8") as f:
        return json.load(f)


def load_answers(path: str) -> dict:
    """question_id -> answer record (for an evaluation harness)."""
    out = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                r = json.loads(line)
                out[r["question_id"]] = r
    return out
