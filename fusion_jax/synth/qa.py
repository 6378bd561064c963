"""Stage 3: question-answer pairs derived from the description.

Every :class:`QAPair` carries a machine-readable ``spec`` (what it asks about the scene);
:func:`evaluate` recomputes the answer from the scene alone, which is how the filters check that
an answer is derivable and unambiguous. Kinds: colour, count, spatial (left/right/above/below),
existence, text reading and scene (caption, shape). Styles: ``short`` (a word or number),
``long`` (a sentence) and ``mc`` (lettered options, the answer is the letter).
"""
from __future__ import annotations

import dataclasses

import numpy as np

from .palette import Palette
from .scene import Scene, noun_phrase, number_word, select, unique_selector

SHORT_SUFFIX = "Answer the question using a single word or phrase."
MC_SUFFIX = "Answer with the option's letter from the given choices directly."
LETTERS = "ABCDEFGH"


class Ambiguous(Exception):
    """The question has no single answer derivable from the description."""


@dataclasses.dataclass
class QAPair:
    kind: str
    qtype: str
    question: str  # the full prompt text (options and instructions included)
    answer: str  # the expected model output (the letter for multiple choice)
    answer_text: str  # the underlying answer (e.g. 'red'), what evaluate(spec) must return
    style: str  # short | long | mc
    spec: dict
    choices: list | None = None
    chance: float = 0.0  # probability a uniform guess over the answer space is right


# ----------------------------------------------------------------------------------------------
def _one(scene: Scene, sel: dict):
    objs = select(scene, sel)
    if len(objs) != 1:
        raise Ambiguous(f"selector {sel} matches {len(objs)} objects")
    return objs[0]


def evaluate(scene: Scene, spec: dict) -> str:
    """The answer (text form) that the description implies for a question spec."""
    op = spec["op"]
    if op == "color_of":
        return _one(scene, spec["sel"]).color
    if op == "shape_of":
        return _one(scene, spec["sel"]).shape
    if op == "count":
        return str(len(select(scene, spec["sel"])))
    if op == "exists":
        return "yes" if select(scene, spec["sel"]) else "no"
    if op in ("lr", "ab", "rel_is"):
        a, b = _one(scene, spec["a"]), _one(scene, spec["b"])
        if a is b:
            raise Ambiguous("both referents are the same object")
        axis = spec.get("axis") or ("x" if op == "lr" else "y")
        d = (a.x - b.x) if axis == "x" else (a.y - b.y)
        if d == 0:
            raise Ambiguous("objects are aligned")
        rel = ("left" if d < 0 else "right") if axis == "x" else ("above" if d < 0 else "below")
        if op == "rel_is":
            return "yes" if rel == spec["rel"] else "no"
        return rel
    if op in ("read_text", "text_color"):
        if len(scene.texts) != 1:
            raise Ambiguous(f"{len(scene.texts)} text items")
        t = scene.texts[0]
        return t.text if op == "read_text" else t.color
    if op == "caption":
        return spec["caption"]
    if op == "objects":
        return list_objects(scene)
    raise ValueError(f"unknown op {op!r}")


def list_objects(scene: Scene) -> str:
    """'a yellow circle, two green squares and a red triangle': every (colour, shape) group,
    ordered by shape then colour name, so the words follow from the image alone."""
    if not scene.objects:
        raise Ambiguous("no objects to list")
    groups: dict = {}
    for o in scene.objects:
        groups[(o.shape, o.color)] = groups.get((o.shape, o.color), 0) + 1
    parts = [(noun_phrase({"color": c, "shape": s}, "a") if n == 1 else
              f"{number_word(n)} {noun_phrase({'color': c, 'shape': s}, '', n)}")
             for (s, c), n in sorted(groups.items())]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def referenced_objects(scene: Scene, spec: dict) -> list:
    """Objects a question is about (those that must be visible for it to be answerable)."""
    op = spec["op"]
    if op == "objects":
        return list(scene.objects)
    if op in ("color_of", "shape_of", "count", "exists"):
        return select(scene, spec["sel"])
    if op in ("lr", "ab", "rel_is"):
        return select(scene, spec["a"]) + select(scene, spec["b"])
    return []


# the share of relation questions asked in the yes / no form; the rest ask for the relation word
SPATIAL_YESNO_FRACTION = 0.3


# ----------------------------------------------------------------------------------------------
class TemplateQAWriter:
    """Built-in ``QAWriter``: templated questions about the structured description.

    ``mc_fraction`` / ``long_fraction``: probability that a pair is multiple choice / has a
    sentence answer (the rest are short). ``short_suffix``: instruction appended to short
    questions (LLaVA's VQA prompt), '' for none. ``varied``: several phrasings per question.
    Spatial questions name objects by shape ('the circle'), adding colour or size only to disambiguate.
    """

    def __init__(self, mc_fraction: float = 0.25, long_fraction: float = 0.3,
                 short_suffix: str = SHORT_SUFFIX, varied: bool = True, num_choices: int = 4):
        self.mc_fraction = mc_fraction
        self.long_fraction = long_fraction
        self.short_suffix = short_suffix
        self.varied = varied
        self.num_choices = num_choices

    # -- helpers -------------------------------------------------------------------------------
    def _pick(self, rng, options):
        if not self.varied:
            return options[0]
        return options[int(rng.integers(len(options)))]

    def _style(self, rng, can_mc=True, can_long=True) -> str:
        u = rng.random()
        if u < self.mc_fraction:
            return "mc" if can_mc else "short"
        if u < self.mc_fraction + self.long_fraction:
            return "long" if can_long else "short"
        return "short"

    def _finish(self, rng, kind, qtype, spec, question, answer, long_answer, vocab, style) -> QAPair:
        vocab = list(dict.fromkeys(vocab))
        if style == "mc":
            k = min(self.num_choices, len(vocab))
            others = [v for v in vocab if v != answer]
            pick = rng.choice(len(others), size=k - 1, replace=False).tolist()
            choices = [others[i] for i in pick] + [answer]
            order = rng.permutation(len(choices)).tolist()
            choices = [choices[i] for i in order]
            letter = LETTERS[choices.index(answer)]
            opts = "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(choices))
            return QAPair(kind, qtype, f"{question}\n{opts}\n{MC_SUFFIX}", letter, answer, "mc", spec,
                          choices=choices, chance=1.0 / len(choices))
        chance = 1.0 / max(1, len(vocab))
        if style == "long":
            return QAPair(kind, qtype, question, long_answer, answer, "long", spec, chance=chance)
        q = f"{question}\n{self.short_suffix}" if self.short_suffix else question
        return QAPair(kind, qtype, q, answer, answer, "short", spec, chance=chance)

    # -- kinds ---------------------------------------------------------------------------------
    def _color(self, scene, rng, p):
        out = []
        for i in rng.permutation(len(scene.objects)).tolist():
            o = scene.objects[i]
            sel = unique_selector(scene, o, exclude=("color",))
            if sel is None:
                continue
            np_ = noun_phrase(sel)
            q = self._pick(rng, [f"What color is {np_}?", f"What is the color of {np_}?",
                                 f"Which color does {np_} have?"])
            out.append(self._finish(rng, "color", "color", {"op": "color_of", "sel": sel}, q, o.color,
                                    f"{np_.capitalize()} is {o.color}.", list(p.colors), self._style(rng)))
        return out

    def _count(self, scene, rng, p):
        groups = {}
        for o in scene.objects:
            groups[(o.color, o.shape)] = groups.get((o.color, o.shape), 0) + 1
        shapes = {}
        for o in scene.objects:
            shapes[o.shape] = shapes.get(o.shape, 0) + 1
        sels = [{"color": c, "shape": s} for (c, s), _ in sorted(groups.items(), key=lambda kv: -kv[1])]
        sels += [{"shape": s} for s, _ in sorted(shapes.items(), key=lambda kv: -kv[1])]
        if p.name == "full":
            sels.append({})
        order = sels[:1] + [sels[i] for i in (1 + rng.permutation(len(sels) - 1)).tolist()] if sels else []
        vocab = [str(i) for i in range(1, p.max_count + 1)]
        out = []
        for sel in order:
            n = len(select(scene, sel))
            if n < 1 or n > p.max_count:
                continue
            noun = noun_phrase({**sel, "shape": sel.get("shape") or "shape"}, "", 2)
            q = self._pick(rng, [f"How many {noun} are there?", f"How many {noun} are in the image?",
                                 f"Count the {noun} in the image."])
            long_a = f"There {'is' if n == 1 else 'are'} {number_word(n)} " \
                     f"{noun_phrase({**sel, 'shape': sel.get('shape') or 'shape'}, '', n)}."
            out.append(self._finish(rng, "count", "count", {"op": "count", "sel": sel}, q, str(n), long_a,
                                    vocab, self._style(rng)))
        return out

    def _spatial(self, scene, rng, p):
        refs = [(o, s) for o in scene.objects if (s := unique_selector(scene, o)) is not None]
        pairs = [(i, j) for i in range(len(refs)) for j in range(len(refs)) if i != j]
        out = []
        for k in rng.permutation(len(pairs)).tolist():
            (a, sa), (b, sb) = refs[pairs[k][0]], refs[pairs[k][1]]
            na, nb = noun_phrase(sa), noun_phrase(sb)
            axis = "x" if abs(a.x - b.x) >= abs(a.y - b.y) else "y"
            form = rng.random()
            if form < SPATIAL_YESNO_FRACTION:
                rel = (("left", "right") if axis == "x" else ("above", "below"))[int(rng.integers(2))]
                phrase = {"left": "to the left of", "right": "to the right of", "above": "above",
                          "below": "below"}[rel]
                spec = {"op": "rel_is", "a": sa, "b": sb, "rel": rel, "axis": axis}
                ans = evaluate(scene, spec)
                q = f"Is {na} {phrase} {nb}?"
                long_a = f"{'Yes' if ans == 'yes' else 'No'}, {na} is " \
                         f"{'' if ans == 'yes' else 'not '}{phrase} {nb}."
                out.append(self._finish(rng, "spatial", "rel_is", spec, q, ans, long_a, ["yes", "no"],
                                        self._style(rng, can_mc=False)))
                continue
            if axis == "x":
                spec = {"op": "lr", "a": sa, "b": sb}
                ans = evaluate(scene, spec)
                q = self._pick(rng, [f"Is {na} to the left or to the right of {nb}?",
                                     f"Is {na} left or right of {nb}?"])
                long_a = f"{na.capitalize()} is to the {ans} of {nb}."
                vocab = ["left", "right"]
            else:
                spec = {"op": "ab", "a": sa, "b": sb}
                ans = evaluate(scene, spec)
                q = self._pick(rng, [f"Is {na} above or below {nb}?",
                                     f"Is {na} higher or lower than {nb}? Answer above or below."])
                long_a = f"{na.capitalize()} is {ans} {nb}."
                vocab = ["above", "below"]
            out.append(self._finish(rng, "spatial", spec["op"], spec, q, ans, long_a, vocab,
                                    self._style(rng)))
        return out

    def _existence(self, scene, rng, p):
        present = sorted({(o.color, o.shape) for o in scene.objects})
        absent = [(c, s) for c in p.colors for s in p.shapes if (c, s) not in present]
        out = []
        pos = [present[i] for i in rng.permutation(len(present)).tolist()]
        neg = [absent[i] for i in rng.permutation(len(absent)).tolist()][:max(2, len(pos))]
        # each turn's answer is an independent coin flip: a fixed yes/no alternation would let
        # a model answer turn 2 from turn 1 without looking at the image
        merged = []
        while pos or neg:
            take_yes = bool(rng.random() < 0.5) if (pos and neg) else bool(pos)
            merged.append((pos if take_yes else neg).pop(0))
        for c, s in merged:
            sel = {"color": c, "shape": s}
            ans = "yes" if (c, s) in present else "no"
            na = noun_phrase(sel, "a")
            q = self._pick(rng, [f"Is there {na} in the image?", f"Does the image contain {na}?",
                                 f"Can you see {na}?"])
            long_a = f"Yes, there is {na} in the image." if ans == "yes" else \
                f"No, there is no {noun_phrase(sel, '')} in the image."
            out.append(self._finish(rng, "existence", "exists", {"op": "exists", "sel": sel}, q, ans,
                                    long_a, ["yes", "no"], self._style(rng, can_mc=False)))
        return out

    def _text(self, scene, rng, p):
        if len(scene.texts) != 1:
            return []
        t = scene.texts[0]
        out = []
        q = self._pick(rng, ["What word is written in the image?", "What does the text in the image say?",
                             "Read the text in the image."])
        out.append(self._finish(rng, "text", "read_text", {"op": "read_text"}, q, t.text,
                                f'The text says "{t.text}".', list(p.words), self._style(rng)))
        if p.name == "full":
            q = f'What color is the text "{t.text}"?'
            out.append(self._finish(rng, "text", "text_color", {"op": "text_color"}, q, t.color,
                                    f'The text "{t.text}" is written in {t.color}.', list(p.colors),
                                    self._style(rng)))
        return out

    def _scene(self, scene, rng, p, caption):
        out = []
        colors = {}
        for o in scene.objects:
            colors[o.color] = colors.get(o.color, 0) + 1
        for c in sorted(colors):
            if colors[c] != 1:
                continue
            sel = {"color": c}
            q = self._pick(rng, [f"What shape is the {c} object?", f"Which shape is {c}?"])
            o = select(scene, sel)[0]
            out.append(self._finish(rng, "scene", "shape_of", {"op": "shape_of", "sel": sel}, q, o.shape,
                                    f"The {c} object is a {o.shape}.", list(p.shapes), self._style(rng)))
        order = rng.permutation(len(out)).tolist()
        out = [out[i] for i in order]
        if p.name == "full" and self.long_fraction > 0:
            q = self._pick(rng, ["Describe the image in detail.", "What is shown in this image?",
                                 "Give a detailed description of the picture."])
            cap = QAPair("scene", "caption", q, caption, caption, "long", {"op": "caption", "caption": caption})
            if rng.random() < 0.5:
                out.insert(0, cap)
            else:
                out.append(cap)
        return out

    def describe(self, scene: Scene, rng: np.random.Generator) -> QAPair | None:
        """'Which shapes are in the image?' answered with every object: a dense, binding-heavy
        training turn (each colour word must match its shape). None for a scene without objects."""
        if not scene.objects:
            return None
        q = self._pick(rng, ["Which shapes are in the image?", "List the shapes in the image.",
                             "What shapes can you see?"])
        spec = {"op": "objects"}
        ans = evaluate(scene, spec)
        return QAPair("scene", "objects", q, ans[0].upper() + ans[1:] + ".", ans, "long", spec)

    def write(self, scene: Scene, caption: str, kind: str, rng: np.random.Generator,
              palette: Palette) -> list:
        if kind == "color":
            return self._color(scene, rng, palette)
        if kind == "count":
            return self._count(scene, rng, palette)
        if kind == "spatial":
            return self._spatial(scene, rng, palette)
        if kind == "existence":
            return self._existence(scene, rng, palette)
        if kind == "text":
            return self._text(scene, rng, palette)
        if kind == "scene":
            return self._scene(scene, rng, palette, caption)
        raise ValueError(f"unknown kind {kind!r}")


def qa_to_dict(qa: QAPair) -> dict:
    return dataclasses.asdict(qa)
