"""MMBench EN / CN (model_vqa_mmbench): a TSV with index, question, hint, A-D, image (base64), ...

Read with pandas as the reference reads it (`read_table` with its default missing values, so an
option cell "None", "nan" or empty ends the option list). The user message is
`hint\\nquestion\\nA. opt\\nB. opt...` (no hint line when the hint is missing) and the letter
suffix (the Chinese one for CN); the vision tower reads it with the suffix. With `all_rounds`
each question is asked once per option, the options rotated one step each round while the
letters stay A, B, ... (the records keep the reference's `round_id`, `options`, `option_char`;
every round has the same question_id, as in the reference). max_new_tokens is 1024.
"""
from __future__ import annotations

import math

from fusion_jax.eval.benchmarks.common import (
    LETTER_SUFFIX,
    LETTER_SUFFIX_CN,
    TOKENS_LONG,
    BenchmarkFormatError,
    image_from_base64,
    question,
)

OPTION_LETTERS = ("A", "B", "C", "D")
REQUIRED = ("index", "question", "hint", "image", *OPTION_LETTERS)


def is_none(value) -> bool:
    """The reference's test for a missing cell: None, NaN, or the strings 'nan' / 'none'."""
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and value.lower() in ("nan", "none")


def read_table(path):
    try:
        import pandas as pd
    except ImportError:
        raise ImportError("MMBench files are read with pandas: pip install pandas") from None
    from etils import epath
    with epath.Path(path).open("r", encoding="utf-8") as f:
        return pd.read_table(f)


def _plain(v):
    return v.item() if hasattr(v, "item") else v       # numpy scalar -> Python


def _options(row) -> list:
    out = []
    for letter in OPTION_LETTERS:
        v = row[letter]
        if is_none(v):
            break
        out.append(_plain(v))
    return out


def _rounds(path, line, row, lang: str, all_rounds: bool) -> list:
    options = _options(row)
    qid = _plain(row["index"])
    image = image_from_base64(row["image"], path, line, "image")
    suffix = LETTER_SUFFIX_CN if lang == "cn" else LETTER_SUFFIX
    letters = list(OPTION_LETTERS[:len(options)])
    out = []
    for round_id in range(len(options) if all_rounds else 1):
        body = row["question"]
        if not isinstance(body, str):
            raise BenchmarkFormatError(path, line, "question", f"expected text, got {body!r:.40}")
        if not is_none(row["hint"]):
            body = f"{row['hint']}\n{body}"
        for letter, opt in zip(OPTION_LETTERS, options, strict=False):
            if not isinstance(opt, str):
                raise BenchmarkFormatError(path, line, letter, f"expected text, got {opt!r:.40}")
            body += f"\n{letter}. {opt}"
        out.append(question(qid, body + "\n" + suffix, image, TOKENS_LONG, instructs=None, prompt=body,
                            round_id=round_id, options=list(options), option_char=list(letters)))
        options, letters = options[1:] + options[:1], letters[1:] + letters[:1]
    return out


def read_mmbench(path, *, lang: str = "en", all_rounds: bool = False, **_) -> list:
    df = read_table(path)
    missing = [c for c in REQUIRED if c not in df.columns]
    if missing:
        raise BenchmarkFormatError(path, 1, missing[0], f"column missing (header has {list(df.columns)})")
    out = []
    for k, (_, row) in enumerate(df.iterrows()):
        out += _rounds(path, k + 2, row, lang, all_rounds)     # line 1 is the header
    return out


def read_mmbench_cn(path, **kw) -> list:
    return read_mmbench(path, **{**kw, "lang": "cn"})
