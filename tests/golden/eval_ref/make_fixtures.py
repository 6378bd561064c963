"""Writes the small benchmark fixtures in the reference's file formats (deterministic), plus the canned
model responses that record.py feeds the reference's scripts.

    python tests/golden/eval_ref/make_fixtures.py      # -> tests/golden/eval_ref/fixtures/
"""
from __future__ import annotations

import base64
import io
import json
import os

from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
FIX = os.path.join(HERE, "fixtures")
LOADER_SUFFIX = "Answer the question using a single word or phrase."
LETTER_SUFFIX = "Answer with the option's letter from the given choices directly."


def _png(size, color, mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format="PNG")
    return buf.getvalue()


def _jsonl(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def _json(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, indent=1)


def images():
    d = os.path.join(FIX, "images")
    os.makedirs(d, exist_ok=True)
    for name, size, color, mode in (("a.png", (20, 16), (200, 10, 10), "RGB"), ("b.png", (8, 12), (0, 90, 200, 128),
                                    "RGBA")):
        with open(os.path.join(d, name), "wb") as f:
            f.write(_png(size, color, mode))
    for k in (1, 2, 3, 4):
        Image.new("RGB", (10 + k, 10), (30 * k, 40, 50)).save(os.path.join(d, f"{k}.jpg"), format="JPEG")


POPE_ANSWERS = {   # category -> (label, response)
    "adversarial": [("yes", "Yes, there is a dog in the image."), ("no", "No there isn't."),
                    ("yes", "There is no dog."), ("no", "Not really, it is a cat")],
    "popular": [("no", "no"), ("yes", "Yes"), ("yes", "It is not clear. Yes it is."), ("no", "yes, no doubt.")],
    "random": [("yes", "Yes."), ("no", "NO"), ("no", "There is a cat, not a dog."), ("yes", "no, there is")],
}


def pope():
    qs, qid = [], 0
    for cat, rows in POPE_ANSWERS.items():
        labels = []
        for i, (label, _) in enumerate(rows):
            qid += 1
            obj = ["dog", "cat", "car", "tree"][i]
            qs.append({"question_id": qid, "image": "a.png",
                       "text": f"Is there a {obj} in the image?\n{LOADER_SUFFIX}", "category": cat})
            labels.append({"question_id": i + 1, "image": "a.png", "text": f"Is there a {obj} in the image?",
                           "label": label})
        _jsonl(os.path.join(FIX, "pope", "coco", f"coco_pope_{cat}.json"), labels)
    _jsonl(os.path.join(FIX, "pope", "llava_pope_test.jsonl"), qs)
    return [r for rows in POPE_ANSWERS.values() for _, r in rows]


TEXTVQA = [  # (image_id, prompt, annotation question, 10 answers, response)
    ("img1", "what brand is this?\nReference OCR token: Coca, Cola\n" + LOADER_SUFFIX, "What brand is this?",
     ["coca-cola"] * 6 + ["coca cola"] * 3 + ["coke"], "Coca-Cola."),
    ("img2", "how many people attended?\n" + LOADER_SUFFIX, "How many people attended?",
     ["10000"] * 2 + ["10,000"] * 5 + ["ten thousand"] * 3, "10,000"),
    ("img3", "OCR tokens: 2005, est Question: What year was it established? Short answer:",
     "What year was it established?", ["2005"] * 9 + ["est 2005"], "The answer is 2005"),
    ("img4", "Reference OCR token: STOP\nwhat does the sign say?\n" + LOADER_SUFFIX, "what does the sign say?",
     ["stop"] * 10, "STOP!"),
    ("img5", "how many cars?\n" + LOADER_SUFFIX, "How many cars?", ["2"] * 4 + ["two"] * 4 + ["none"] * 2, "Two"),
    ("img6", "is it open?\n" + LOADER_SUFFIX, "Is it open?", ["no"] * 8 + ["none"] * 2, "None"),
]


def textvqa():
    _jsonl(os.path.join(FIX, "textvqa", "llava_textvqa_val_v051_ocr.jsonl"),
           [{"question_id": i, "image": "a.png", "text": p} for i, p, *_ in TEXTVQA])
    _json(os.path.join(FIX, "textvqa", "TextVQA_0.5.1_val.json"),
          {"dataset_name": "textvqa", "data": [{"image_id": i, "question": q, "answers": a, "question_id": k}
                                               for k, (i, _, q, a, _) in enumerate(TEXTVQA)]})
    return [r for *_, r in TEXTVQA]


SQA = [  # (id, question value, image, choices, answer index, response)
    ("1", "<image>\nContext: A map.\nWhich state is shown?\nA. Ohio\nB. Utah\nC. Iowa", "a.png",
     ["Ohio", "Utah", "Iowa"], 1, "(B)"),
    ("2", "Which word is a noun?\nA. run\nB. blue\nC. cat", None, ["run", "blue", "cat"], 2, "The answer is C."),
    ("3", "<image>\nWhich color?\nA. red\nB. blue\nC. green", "b.png", ["red", "blue", "green"], 0, "E"),
    ("4", "What is 2+2?\nA. 3\nB. 4", None, ["3", "4"], 1, "B, because 2+2=4"),
    ("5", "<image>\nWhich animal?\nA. dog\nB. cat", "a.png", ["dog", "cat"], 0, None),       # never answered
    ("6", "  <image>\n Is it hot?\nA. yes\nB. no  ", "a.png", ["yes", "no"], 0, "A"),
]


def scienceqa():
    recs = []
    for pid, value, img, *_ in SQA:
        r = {"id": pid, "conversations": [{"from": "human", "value": value}, {"from": "gpt", "value": "A"}]}
        if img:
            r["image"] = img
        recs.append(r)
    _json(os.path.join(FIX, "scienceqa", "llava_test_CQM-A.json"), recs)
    problems = {pid: {"question": v, "choices": c, "answer": a, "image": img, "split": "test"}
                for pid, v, img, c, a, _ in SQA}
    problems["7"] = {"question": "x", "choices": ["a", "b"], "answer": 0, "image": None, "split": "val"}
    _json(os.path.join(FIX, "scienceqa", "problems.json"), problems)
    _json(os.path.join(FIX, "scienceqa", "pid_splits.json"), {"test": [p[0] for p in SQA], "val": ["7"]})
    return [r for *_, r in SQA]


CVBENCH = [  # (id, source, has image, answer, response)
    (0, "ADE20K", True, "B", "(B)"), (1, "ADE20K", True, "A", "The answer is C."),
    (2, "COCO", True, "C", "C"), (3, "COCO", False, "A", "A. one"), (4, "COCO", True, "D", "D, four"),
    (5, "Omni3D", True, "B", "(A) closer"), (6, "Omni3D", True, "A", "F"), (7, "Omni3D", True, "E", "E\nbecause"),
]


def cvbench():
    rows = []
    for i, src, img, ans, _ in CVBENCH:
        r = {"id": i, "prompt": "<image>\nHow many chairs are there? Select from the following choices.\n"
                                "(A) 1\n(B) 2\n(C) 3\n(D) 4\n(E) 5", "answer": ans, "source": src}
        if img:
            r["image"] = "a.png"
        rows.append(r)
    _jsonl(os.path.join(FIX, "cvbench", "test.jsonl"), rows)
    return [r for *_, r in CVBENCH]


MMVP = [(1, "A", "(A)"), (2, "B", "The answer is A."), (3, "A", "a"), (4, "B", "B. Closed")]


def mmvp():
    _jsonl(os.path.join(FIX, "mmvp", "Questions.jsonl"),
           [{"Index": i, "Question": "Is the door open?", "Options": "(A) Open (B) Closed", "Correct Answer": g}
            for i, g, _ in MMVP])
    return [r for *_, r in MMVP]


def _b64(size, color) -> str:
    return base64.b64encode(_png(size, color)).decode()


MMBENCH = [  # index, question, hint, options A-D ("" = missing), answer
    (10, "What is shown?", "A hint line.", ["a cat", "a dog", "a car", "a tree"], "A"),
    (11, "Which one is red?", "", ["left", "right", "", ""], "B"),
    (12, "Pick one.", "none", ["3", "None", "x", "y"], "A"),
    (13, "How many?", "Count them.\nCarefully.", ["1", "2", "3", ""], "C"),
]


def _mmbench_tsv(path, rows, cn: bool):
    import pandas as pd
    recs = []
    for k, (idx, q, hint, opts, ans) in enumerate(rows):
        if cn:
            q, hint = "图中是什么？" + q, ("提示：" + hint) if hint else hint
        recs.append({"index": idx, "question": q, "hint": hint, "A": opts[0], "B": opts[1], "C": opts[2],
                     "D": opts[3], "answer": ans, "category": "cat", "source": "src", "l2-category": "l2",
                     "comment": "", "split": "test", "image": _b64((6 + k, 6), (10 * k, 100, 50))})
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pd.DataFrame(recs).to_csv(path, sep="\t", index=False)


def mmbench():
    _mmbench_tsv(os.path.join(FIX, "mmbench", "MMBench_TEST_EN_legacy.tsv"), MMBENCH, cn=False)
    _mmbench_tsv(os.path.join(FIX, "mmbench", "MMBench_TEST_CN_legacy.tsv"), MMBENCH, cn=True)
    # one response per (question, round) in all-rounds order (rounds = number of options)
    return ["A", "(B) a dog", "C", "D", "B", "A", "A", "B", "The answer is C.", "C", "B", "A"]


MMMU = [  # subject, n, question_type, question, options, answer, response
    ("Accounting", 1, "multiple-choice", "<image 1> What is the total?", ["$10", "$20", "$30"], "B", "(B)"),
    ("Accounting", 2, "open", "Compute the revenue. <image 1>", [], "10000", "The revenue is 10,000."),
    ("Art_Theory", 1, "multiple-choice", "Which style?", ["Baroque", "Gothic", "Cubism", "Dada"], "C",
     "The answer is C."),
    ("Art_Theory", 2, "multiple-choice", "Who painted it?", ["Monet", "Manet"], "A",
     "I am not sure which painter made this one here"),
    ("Art_Theory", 3, "multiple-choice", "Which era?", ["Old", "New", "Modern", "Ancient"], "D",
     "It looks like it is from the Ancient period rather than Modern times"),
    ("Math", 1, "open", "What is x? <image 1>", [], "3.5", "x = 3.50"),
    ("Math", 2, "open", "Name the shape.", [], "Coca-Cola", "coca-cola."),
    ("Math", 3, "multiple-choice", "Pick.", ["1", "2", "3", "4", "5"], "E", "A B C D"),
]


def mmmu():
    import pyarrow as pa
    import pyarrow.parquet as pq
    by_subject = {}
    for k, (subj, n, qt, q, opts, ans, _) in enumerate(MMMU):
        img = None if (subj, n) == ("Art_Theory", 2) else {"bytes": _png((9 + k, 7), (k * 20, 0, 0)),
                                                            "path": f"{subj}_{n}.png"}
        by_subject.setdefault(subj, []).append({
            "id": f"validation_{subj}_{n}", "question": q, "options": repr(opts), "explanation": "",
            "image_1": img, "image_2": None, "img_type": "['Diagrams']", "answer": ans,
            "topic_difficulty": "Easy", "question_type": qt, "subfield": "x"})
    for subj, rows in by_subject.items():
        d = os.path.join(FIX, "mmmu", "MMMU", subj)
        os.makedirs(d, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows), os.path.join(d, "validation-00000-of-00001.parquet"))
    return [r[-1] for r in MMMU]


LOADER_FILES = {   # benchmark -> (question file, rows)
    "mme": ("mme/llava_mme.jsonl", [{"question_id": "code/0001.png", "image": "a.png",
                                     "text": "Is this a python code? Please answer yes or no."}]),
    "gqa": ("gqa/llava_gqa_testdev_balanced.jsonl", [{"question_id": "201", "image": "a.png",
                                                      "text": "Is the sky blue?\n" + LOADER_SUFFIX}]),
    "vqav2": ("vqav2/llava_vqav2_mscoco_test-dev2015.jsonl",
              [{"question_id": 1, "image": "a.png", "text": "What color?\n" + LOADER_SUFFIX},
               {"question_id": 2, "image": "b.png", "text": "How many?\n" + LOADER_SUFFIX}]),
    "vizwiz": ("vizwiz/llava_test.jsonl",
               [{"question_id": "VizWiz_test_0.jpg", "image": "a.png",
                 "text": "What is this?\nWhen the provided information is insufficient, respond with 'Unanswerable'."
                         "\n" + LOADER_SUFFIX},
                {"question_id": "VizWiz_test_1.jpg", "image": "b.png", "text": "Which can?\n" + LOADER_SUFFIX}]),
    "seed": ("seed/llava-seed-bench.jsonl",
             [{"question_id": 101, "image": "a.png", "text": "Q?\nA. x\nB. y\n" + LETTER_SUFFIX},
              {"question_id": 102, "image": "b.png", "text": "Q2?\nA. x\nB. y\n" + LETTER_SUFFIX},
              {"question_id": 103, "image": "a.png", "text": "Video?\nA. x\nB. y\n" + LETTER_SUFFIX}]),
    "mmvet": ("mmvet/llava-mm-vet-cot.jsonl", [{"question_id": 0, "image": "a.png", "text": "What is this?"},
                                               {"question_id": 1, "image": "b.png", "text": "Explain the joke."}]),
}
LOADER_RESPONSES = {"mme": ["Yes."], "gqa": ["Yes."], "vqav2": ["Red.", "Two"],
                    "vizwiz": ["A can of Coca-Cola.", "unanswerable"], "seed": ["A", "B", "B"],
                    "mmvet": ["A dog.", "It is funny because \"cats\" can't talk."]}


def others():
    for path, rows in LOADER_FILES.values():
        _jsonl(os.path.join(FIX, path), rows)
    _jsonl(os.path.join(FIX, "vqav2", "llava_vqav2_mscoco_test2015.jsonl"),
           LOADER_FILES["vqav2"][1] + [{"question_id": 3, "image": "a.png", "text": "Unanswered?"}])
    _json(os.path.join(FIX, "seed", "SEED-Bench.json"), {
        "question_type": {"Scene Understanding": 1, "Action Recognition": 11},
        "questions": [{"question_id": "101", "answer": "A", "question_type_id": 1, "data_type": "image"},
                      {"question_id": "102", "answer": "A", "question_type_id": 1, "data_type": "image"},
                      {"question_id": "103", "answer": "B", "question_type_id": 11, "data_type": "video"}]})


def main():
    images()
    responses = {"pope": pope(), "textvqa": textvqa(), "scienceqa": scienceqa(), "cvbench": cvbench(),
                 "mmvp": mmvp(), "mmbench": mmbench(), "mmmu": mmmu()}
    others()
    responses.update(LOADER_RESPONSES)
    _json(os.path.join(FIX, "responses.json"), responses)


if __name__ == "__main__":
    main()
