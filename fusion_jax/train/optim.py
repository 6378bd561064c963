"""Optimizer: AdamW, 3% linear warmup then cosine (HF `get_cosine_schedule_with_warmup`),
global-norm clipping, a separate vision-tower learning rate, and freezing by path patterns.

Parameters are addressed by their '/'-joined path in the model's pure-dict state, e.g.
`model/vision_tower/layers/mlp/fc1/kernel` or `lm_head/kernel`. Patterns are Python regular
expressions matched with `re.search`.
"""
from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import optax

VISION_PATTERN = r"^model/vision_tower/"


def path_str(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def _compile(patterns: Sequence[str] | str | None, key: str):
    if not patterns:
        return []
    if isinstance(patterns, str):
        patterns = [p for p in patterns.split(",") if p.strip()]
    out = []
    for p in patterns:
        try:
            out.append(re.compile(p.strip()))
        except re.error as e:
            raise ValueError(f"config.{key}: bad regular expression {p!r} ({e})") from e
    return out


def param_labels(params, *, freeze=(), vision_pattern: str = VISION_PATTERN, check: bool = True,
                 lora=None):
    """Tree of 'frozen' | 'vision' | 'default', same structure as `params`. With `lora` (a LoraConfig)
    everything but the adapters and `lora.full_train` is frozen too: only they get optimizer state."""
    fz = _compile(freeze, "freeze")
    vis = re.compile(vision_pattern)
    hits = {p.pattern: 0 for p in fz}

    def one(path, _):
        s = path_str(path)
        for p in fz:
            if p.search(s):
                hits[p.pattern] += 1
                return "frozen"
        if lora is not None:
            from fusion_jax.lora import is_trainable
            if not is_trainable(s, lora):
                return "frozen"
        return "vision" if vis.search(s) else "default"

    labels = jax.tree_util.tree_map_with_path(one, params)
    if check:
        unused = [p for p, n in hits.items() if n == 0]
        if unused:
            raise ValueError(f"config.freeze: pattern(s) {unused} match no parameter "
                             f"(paths look like 'model/vision_tower/layers/mlp/fc1/kernel')")
    return labels


def warmup_steps(total_steps: int, warmup_ratio: float) -> int:
    """HF TrainingArguments.get_warmup_steps: ceil(ratio * total)."""
    return int(math.ceil(total_steps * warmup_ratio))


def make_schedule(peak: float, total_steps: int, warmup_ratio: float = 0.03, schedule: str = "cosine"):
    w = warmup_steps(total_steps, warmup_ratio)
    if schedule == "cosine":
        if total_steps <= w:
            return optax.linear_schedule(0.0, peak, max(w, 1))
        return optax.warmup_cosine_decay_schedule(0.0, peak, w, total_steps)
    if schedule == "linear":
        return optax.join_schedules([optax.linear_schedule(0.0, peak, max(w, 1)),
                                     optax.linear_schedule(peak, 0.0, max(total_steps - w, 1))], [w])
    if schedule == "constant":
        return optax.join_schedules([optax.linear_schedule(0.0, peak, max(w, 1)),
                                     optax.constant_schedule(peak)], [w])
    raise ValueError(f"config.schedule={schedule!r}: expected cosine | linear | constant")


def make_optimizer(params, *, lr: float, total_steps: int, vision_lr: float | None = None,
                   warmup_ratio: float = 0.03, schedule: str = "cosine", weight_decay: float = 0.0,
                   b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, grad_clip: float | None = 1.0,
                   freeze=(), vision_pattern: str = VISION_PATTERN, lora=None):
    """(tx, labels, schedules): an optax GradientTransformation over `params` (a pure dict).

    Frozen parameters get `set_to_zero` (no optimizer state, bit-identical params). The train
    step also stops their gradients, so they do not enter the clipping norm.
    """
    labels = param_labels(params, freeze=freeze, vision_pattern=vision_pattern, lora=lora)
    sched = make_schedule(lr, total_steps, warmup_ratio, schedule)
    vsched = make_schedule(lr if vision_lr is None else vision_lr, total_steps, warmup_ratio, schedule)

    def adamw(s):
        return optax.adamw(s, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)

    present = set(jax.tree.leaves(labels))
    transforms = {"default": adamw(sched), "vision": adamw(vsched), "frozen": optax.set_to_zero()}
    transforms = {k: v for k, v in transforms.items() if k in present}
    tx = optax.multi_transform(transforms, labels)
    if grad_clip:
        clip = optax.clip_by_global_norm(grad_clip)
        tx = Clipped(*optax.chain(clip, tx), clip=clip, inner=tx)
    return tx, labels, {"lr": sched, "vision_lr": vsched}


class Clipped(NamedTuple):
    """`optax.chain(clip, inner)` with its two parts kept: the streamed update (train.streamed) clips
    the whole gradient once and runs `inner` one parameter at a time."""
    init: Callable
    update: Callable
    clip: optax.GradientTransformation
    inner: optax.GradientTransformation
