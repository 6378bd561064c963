"""LLaVA-style records: JSON / JSONL files, YAML mixtures, sampling strategies, validation.

Records are kept as raw payloads (a JSONL line, or the parsed dict of a .json file) and parsed
lazily in the per-sample map, so a malformed line is a counted skip inside training rather than
a crash at start-up. Skip reasons are the keys of SKIP_REASONS.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os

import numpy as np
import yaml
from etils import epath

from fusion_jax import paths
from fusion_jax.constants import (
    DEFAULT_IM_END_TOKEN,
    DEFAULT_IM_START_TOKEN,
    DEFAULT_IMAGE_TOKEN,
    DEFAULT_LATENT_IMAGE_TOKEN,
)

SKIP_REASONS = {
    "malformed_json": "a JSONL line that does not parse",
    "bad_record": "record is not an object, or lacks a conversations list",
    "unknown_role": "a turn whose 'from' is not human/gpt",
    "bad_value": "a null, non-string or empty turn value (or image field)",
    "broken_conversation": "turns do not alternate human/gpt",
    "no_answer_round": "no human-then-answer round left",
    "bad_image_tag": "<image> in an answer, in several turns, or in a text-only record",
    "bad_latent_tag": "literal <latent_image> in a turn (only the template places it)",
    "unsafe_image_path": "absolute image path, or one with '..'",
    "image_link_escapes": "image path resolves (through a symlink) outside the image folder",
    "not_a_regular_file": "image path is a directory, FIFO, device or socket (never opened)",
    "image_file_too_large": "image file over the byte cap (checked before reading)",
    "missing_image": "image file missing",
    "empty_image": "image file is empty",
    "truncated_image": "image file is truncated",
    "not_an_image": "file is not a readable image",
    "corrupt_image": "image decodes with an error",
    "image_too_large": "pixel count over the limit (checked before decoding)",
    "nothing_to_learn": "no supervised token left after truncation",
    "unexpected_error": "any other exception while preprocessing (type and message kept)",
}
REPAIRS = {
    "leading_answer_dropped": "first turn was an answer (dropped, as the reference does)",
    "trailing_question_dropped": "last question had no answer",
    "questions_truncated": "more rounds than max_questions: later rounds dropped",
    "instructs_truncated": "instruct tokens cut to max_instruct_len",
}


class InputError(Exception):
    """The input itself cannot be read (missing file, invalid YAML / JSON array)."""


class Skip(Exception):
    def __init__(self, reason: str, detail: str = ""):
        assert reason in SKIP_REASONS, reason
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    json_path: str
    sampling_strategy: str = "all"
    image_folder: str | None = None


def _resolve(path: str, base_dir: str) -> str:
    if paths.is_url(path) or epath.Path(path).is_absolute():
        return path
    for cand in (paths.join(base_dir, path), path):
        if paths.exists(cand):
            return cand
    return paths.join(base_dir, path)


def load_mixture(path: str) -> list[DatasetSpec]:
    """A YAML mixture (`datasets: [{json_path, sampling_strategy}]`) or a single JSON/JSONL file."""
    if not paths.isfile(path):
        raise InputError(f"{path}: no such file")
    if path.endswith((".yaml", ".yml")):
        try:
            cfg = yaml.safe_load(epath.Path(path).read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            raise InputError(f"{path}: invalid YAML ({e})") from e
        if not isinstance(cfg, dict) or not isinstance(cfg.get("datasets"), list):
            raise InputError(f"{path}: expected a mapping with a 'datasets' list")
        specs = []
        base = os.fspath(epath.Path(paths.absolute(path)).parent)
        for k, d in enumerate(cfg["datasets"]):
            if not isinstance(d, dict) or "json_path" not in d:
                raise InputError(f"{path}: datasets[{k}] needs a json_path")
            folder = d.get("image_folder")
            specs.append(DatasetSpec(_resolve(str(d["json_path"]), base),
                                     str(d.get("sampling_strategy", "all")),
                                     _resolve(folder, base) if folder else None))
        return specs
    if path.endswith((".json", ".jsonl")):
        return [DatasetSpec(path)]
    raise InputError(f"{path}: unsupported file type (want .yaml, .json or .jsonl)")


def parse_strategy(strategy: str, n: int) -> tuple[str, int | None]:
    """'all' | 'first:N' | 'end:N' | 'random:N', N a count or a percentage (rounded up)."""
    strategy = strategy.strip()
    if strategy == "all":
        return "all", None
    kind, _, num = strategy.partition(":")
    if kind not in ("first", "end", "random") or not num:
        raise InputError(f"unknown sampling_strategy {strategy!r}")
    try:
        count = math.ceil(float(num[:-1]) * n / 100) if num.endswith("%") else int(num)
    except ValueError:
        raise InputError(f"bad count in sampling_strategy {strategy!r}") from None
    if count < 0:
        raise InputError(f"negative count in sampling_strategy {strategy!r}")
    return kind, count


def apply_strategy(n: int, strategy: str, rng: np.random.Generator) -> np.ndarray:
    kind, count = parse_strategy(strategy, n)
    idx = np.arange(n)
    if kind == "first":
        return idx[:count]
    if kind == "end":
        return idx[n - min(count, n):]
    if kind == "random":
        return rng.permutation(n)[:count]
    return idx


def read_json_file(path: str) -> tuple[list, np.ndarray]:
    """Raw payloads of one file and their positions: bytes per JSONL line (blank lines ignored,
    positions are 1-based line numbers), dicts for .json (0-based indices)."""
    if not paths.isfile(path):
        raise InputError(f"{path}: no such file")
    if path.endswith(".jsonl"):
        lines = epath.Path(path).read_bytes().splitlines(keepends=True)
        pairs = [(line, k) for k, line in enumerate(lines, 1) if line.strip()]
        return [p for p, _ in pairs], np.asarray([k for _, k in pairs], np.int64)
    if path.endswith(".json"):
        try:
            data = json.loads(epath.Path(path).read_bytes().decode("utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise InputError(f"{path}: not valid JSON ({e})") from e
        if not isinstance(data, list):
            raise InputError(f"{path}: expected a JSON array of records")
        return data, np.arange(len(data), dtype=np.int64)
    raise InputError(f"{path}: unsupported file type (want .json or .jsonl)")


class JsonRecordSource:
    """Random-access source over a mixture: item i -> {payload, key, image_folder}."""

    def __init__(self, specs: list[DatasetSpec], *, image_folder: str | None = None, seed: int = 0):
        self.files = [s.json_path for s in specs]
        self.folders = [s.image_folder or image_folder for s in specs]
        payloads, file_idx, pos = [], [], []
        rng = np.random.default_rng(seed)
        for k, spec in enumerate(specs):
            items, where = read_json_file(spec.json_path)
            keep = apply_strategy(len(items), spec.sampling_strategy, rng)
            payloads.extend(items[i] for i in keep)
            file_idx.append(np.full(len(keep), k, np.int32))
            pos.append(where[keep])
        self._payloads = payloads
        self._file = np.concatenate(file_idx) if file_idx else np.zeros(0, np.int32)
        self._pos = np.concatenate(pos) if pos else np.zeros(0, np.int64)

    @classmethod
    def from_path(cls, path: str, **kw) -> JsonRecordSource:
        return cls(load_mixture(path), **kw)

    def __len__(self) -> int:
        return len(self._payloads)

    def __getitem__(self, i: int) -> dict:
        k = int(self._file[i])
        return {"payload": self._payloads[i], "key": f"{epath.Path(self.files[k]).name}:{int(self._pos[i])}",
                "image_folder": self.folders[k]}

    def modality_lengths(self) -> np.ndarray:
        """The reference's modality_lengths (word counts; negative for text-only); 1 if unparseable."""
        out = np.ones(len(self), np.int64)
        for i, p in enumerate(self._payloads):
            try:
                rec = json.loads(p) if isinstance(p, (bytes, str)) else p
                n = sum(len(c["value"].split()) for c in rec["conversations"])
                out[i] = max(n, 1) if "image" in rec else -max(n, 1)
            except Exception:  # noqa: BLE001 - bad records get skipped later; any length will do
                pass
        return out


def parse_record(payload, key: str = "?") -> dict:
    if isinstance(payload, (bytes, str)):
        try:
            rec = json.loads(payload)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise Skip("malformed_json", f"{key}: {e}") from None
    else:
        rec = payload
    if not isinstance(rec, dict):
        raise Skip("bad_record", f"{key}: record is {type(rec).__name__}, not an object")
    if not isinstance(rec.get("conversations"), list):
        raise Skip("bad_record", f"{key}: no conversations list")
    return rec


def record_id(rec: dict, key: str) -> str:
    rid = rec.get("id") if isinstance(rec, dict) else None
    return str(rid) if rid is not None else key


def _move_image_tag(value: str) -> str:
    """preprocess_multimodal with mm_use_im_start_end: one `<vs><image><ve>\\n` in front."""
    if DEFAULT_IMAGE_TOKEN in value:
        value = DEFAULT_IMAGE_TOKEN + "\n" + value.replace(DEFAULT_IMAGE_TOKEN, "").strip()
        value = value.strip()
    return value.replace(DEFAULT_IMAGE_TOKEN, DEFAULT_IM_START_TOKEN + DEFAULT_IMAGE_TOKEN + DEFAULT_IM_END_TOKEN)


def conversation_rounds(rec: dict, *, has_image: bool, max_questions: int | None = None,
                        key: str = "?") -> tuple[list[tuple[str, str]], list[str]]:
    """Validate turns and pair them into (question, answer) rounds; returns (rounds, repairs)."""
    turns, repairs = [], []
    for j, t in enumerate(rec["conversations"]):
        if not isinstance(t, dict):
            raise Skip("bad_record", f"{key}: turn {j} is not an object")
        role, value = t.get("from"), t.get("value")
        if role not in ("human", "gpt"):
            raise Skip("unknown_role", f"{key}: turn {j} has role {role!r}")
        if not isinstance(value, str) or not value.strip():
            raise Skip("bad_value", f"{key}: turn {j} value is {value!r:.40}")
        turns.append((role, value))
    if turns and turns[0][0] != "human":
        turns = turns[1:]
        repairs.append("leading_answer_dropped")
    for j, (role, _) in enumerate(turns):
        if role != ("human" if j % 2 == 0 else "gpt"):
            raise Skip("broken_conversation", f"{key}: turn {j} should not be {role!r}")
    if len(turns) % 2:
        turns = turns[:-1]
        repairs.append("trailing_question_dropped")
    if not turns:
        raise Skip("no_answer_round", f"{key}: no human-then-answer round")
    latent = [j for j, (_, v) in enumerate(turns) if DEFAULT_LATENT_IMAGE_TOKEN in v]
    if latent:  # it would add a latent block the layout never planned for
        raise Skip("bad_latent_tag", f"{key}: {DEFAULT_LATENT_IMAGE_TOKEN} in turns {latent}")
    tagged = [j for j, (_, v) in enumerate(turns) if DEFAULT_IMAGE_TOKEN in v]
    if tagged and (not has_image or len(tagged) > 1 or tagged[0] % 2):
        raise Skip("bad_image_tag", f"{key}: <image> in turns {tagged} (image record: {has_image})")
    if has_image:
        turns = [(r, _move_image_tag(v)) for r, v in turns]
    rounds = [(turns[j][1], turns[j + 1][1]) for j in range(0, len(turns), 2)]
    if max_questions is not None and len(rounds) > max_questions:
        rounds = rounds[:max_questions]
        repairs.append("questions_truncated")
    return rounds, repairs
