"""MMMU (fusion/eval/MMMU/eval/run_fusion.py with configs/llava1.5.yaml), read from disk.

Data: the HF dataset folder (`Subject/validation-*.parquet`, subjects in the reference's
order), one parquet file, or a JSON / JSONL file of the same records (`image_1` a path relative
to --image-folder, or null).

As the reference: only `image_1` is used (its test for images inside the options iterates the
characters of the options *string*, so it never fires); a question without `image_1` gets the
image tag and a zero image (the reference passes zeros; we pass a mid-grey image, see
GREY_IMAGE); the options string is parsed as a Python literal (safely, not `eval`); prompts
follow the yaml config below; max_new_tokens is 2048. The instructs quirk: the vision tower
reads the whole *rendered* prompt (system text and role headers included, image tags
stripped), so `mmmu_instructs(text, template)` fills it once the chat template is known.
"""
from __future__ import annotations

import ast

from etils import epath

from fusion_jax.eval.benchmarks.common import (
    TOKENS_MMMU,
    BenchmarkFormatError,
    field,
    image_from_bytes,
    json_document,
    jsonl_records,
    question,
)

SUBJECTS = ("Accounting", "Agriculture", "Architecture_and_Engineering", "Art", "Art_Theory",
            "Basic_Medical_Science", "Biology", "Chemistry", "Clinical_Medicine", "Computer_Science", "Design",
            "Diagnostics_and_Laboratory_Medicine", "Economics", "Electronics", "Energy_and_Power", "Finance",
            "Geography", "History", "Literature", "Manage", "Marketing", "Materials", "Math",
            "Mechanical_Engineering", "Music", "Pharmacy", "Physics", "Psychology", "Public_Health", "Sociology")
DOMAINS = {
    "Art and Design": ("Art", "Art_Theory", "Design", "Music"),
    "Business": ("Accounting", "Economics", "Finance", "Manage", "Marketing"),
    "Science": ("Biology", "Chemistry", "Geography", "Math", "Physics"),
    "Health and Medicine": ("Basic_Medical_Science", "Clinical_Medicine", "Diagnostics_and_Laboratory_Medicine",
                            "Pharmacy", "Public_Health"),
    "Humanities and Social Science": ("History", "Literature", "Sociology", "Psychology"),
    "Tech and Engineering": ("Agriculture", "Architecture_and_Engineering", "Computer_Science", "Electronics",
                             "Energy_and_Power", "Materials", "Mechanical_Engineering"),
}
# configs/llava1.5.yaml after yaml folding, each list's single value
PROMPT_CONFIG = {
    "task_instructions": "",
    "multi_choice_example_format": "{}\n{}\nAnswer with the option's letter from the given choices directly.",
    "short_ans_example_format": "{}\nAnswer the question using a single word or phrase.",
}
GREY_IMAGE = (128, 128, 128)   # stands in for the reference's all-zero (normalized) image tensor
FIELDS = ("id", "question", "options", "answer", "question_type")


def subject_of(qid: str) -> str:
    """validation_Art_Theory_12 -> Art_Theory (as main_eval_only.py groups)."""
    return "_".join(str(qid).split("_")[1:-1])


def parse_options(s, path, where) -> list:
    try:
        opts = ast.literal_eval(s) if isinstance(s, str) else s
    except (ValueError, SyntaxError) as e:
        raise BenchmarkFormatError(path, where, "options", f"not a Python list literal ({e})") from None
    if not isinstance(opts, list):
        raise BenchmarkFormatError(path, where, "options", f"expected a list, got {type(opts).__name__}")
    return [str(o) for o in opts]


def build_text(q: str, question_type: str, options: list, config=None) -> str:
    """construct_prompt: the final input prompt (before the image tag)."""
    config = config or PROMPT_CONFIG
    if question_type == "multiple-choice":
        example = "".join(f"{chr(ord('A') + k)}. {o}\n" for k, o in enumerate(options))
        prompt = config["multi_choice_example_format"].format(q, example)
    else:
        prompt = config["short_ans_example_format"].format(q)
    if config["task_instructions"]:
        prompt = config["task_instructions"].strip() + "\n\n" + prompt
    return prompt


def mmmu_instructs(text: str, template) -> str:
    """What call_fusion_engine_df tokenizes for the vision tower: the rendered prompt, tags stripped."""
    from fusion_jax.data.templates import get_template, strip_tags
    from fusion_jax.generate.prompts import image_question, render_prompt
    t = get_template(template) if isinstance(template, str) else template
    return strip_tags(render_prompt(t, [(image_question(text), None)]))


def _image(rec, path, where, image_folder_relative: bool):
    img = rec.get("image_1")
    if img is None:
        from PIL import Image
        return Image.new("RGB", (384, 384), GREY_IMAGE)
    if isinstance(img, dict) and isinstance(img.get("bytes"), (bytes, bytearray)):
        return image_from_bytes(bytes(img["bytes"]), path, where, "image_1")
    if isinstance(img, dict) and isinstance(img.get("path"), str) and img["path"]:
        return img["path"]
    if isinstance(img, str) and img.strip() and image_folder_relative:
        return img
    raise BenchmarkFormatError(path, where, "image_1", f"expected image bytes or a path, got {type(img).__name__}")


def _question(rec, path, where, from_json: bool) -> dict:
    for name in FIELDS:
        if name not in rec:
            raise BenchmarkFormatError(path, where, name, "missing")
    qid = field(rec, "id", path, where)
    qtype = field(rec, "question_type", path, where)
    options = parse_options(rec["options"], path, where)
    answer = rec["answer"]
    if qtype == "multiple-choice" and not (isinstance(answer, str) and len(answer) == 1
                                           and 0 <= ord(answer.upper()) - ord("A") < len(options)):
        raise BenchmarkFormatError(path, where, "answer", f"{answer!r} is not one of the {len(options)} option letters")
    text = build_text(field(rec, "question", path, where, allow_empty=True), qtype, options)
    return question(qid, text, _image(rec, path, where, from_json), TOKENS_MMMU, instructs=None,
                    instructs_from_prompt=True, question_type=qtype, answer=answer, options=options,
                    subject=subject_of(qid))


def _parquet_rows(path) -> list:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError("MMMU parquet files are read with pyarrow: pip install pyarrow") from None
    with epath.Path(path).open("rb") as f:
        return pq.read_table(f).to_pylist()


def _files(root, split: str) -> list:
    p = epath.Path(root)
    if p.is_dir():
        found = [f for s in SUBJECTS if (p / s).is_dir() for f in sorted((p / s).glob(f"{split}-*.parquet"))]
        if not found:
            raise FileNotFoundError(f"{root}: no <Subject>/{split}-*.parquet files (the HF MMMU layout)")
        return found
    if not p.exists():
        raise FileNotFoundError(f"{root}: no such file or folder")
    return [p]


def read_mmmu(path, *, split: str | None = None, **_) -> list:
    out = []
    for f in _files(path, split or "validation"):
        name = str(f)
        if name.endswith(".parquet"):
            rows = [(f"row {k}", r) for k, r in enumerate(_parquet_rows(f))]
        elif name.endswith(".jsonl"):
            rows = jsonl_records(f)
        else:
            doc = json_document(f)
            if not isinstance(doc, list):
                raise BenchmarkFormatError(f, None, None, "expected a JSON list of MMMU records")
            rows = [(f"record {k}", r) for k, r in enumerate(doc)]
        for where, rec in rows:
            if not isinstance(rec, dict):
                raise BenchmarkFormatError(f, where, None, "expected an object")
            out.append(_question(rec, f, where, from_json=not name.endswith(".parquet")))
    return out
