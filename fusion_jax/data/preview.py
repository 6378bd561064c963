"""`preview`: one sample rendered for a human (prompt, supervised spans, the 5 crops as a PNG grid)."""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from fusion_jax.constants import IMAGE_TOKEN_INDEX, INSTRUCT_INDEX, LATENT_IMAGE_TOKEN_INDEX
from fusion_jax.data.records import InputError, parse_record, record_id
from fusion_jax.data.sample import SampleProcessor, Skipped


def render_tokens(tok, ids: np.ndarray, labels: np.ndarray) -> str:
    """Prompt with placeholders; supervised spans as [[...]], question ends as <<INSTRUCT>>."""
    out, cur, sup = [], [], False

    def flush():
        if cur:
            text = tok.decode(cur)
            out.append(f"[[{text}]]" if sup else text)
            cur.clear()
    for t, lab in zip(ids.tolist(), labels.tolist(), strict=True):
        if t in (IMAGE_TOKEN_INDEX, LATENT_IMAGE_TOKEN_INDEX):
            flush()
            out.append("<image>" if t == IMAGE_TOKEN_INDEX else "<latent_image>")
            continue
        s = lab >= 0
        if s != sup:
            flush()
            sup = s
        cur.append(t)
        if lab == INSTRUCT_INDEX:
            flush()
            out.append("<<INSTRUCT>>")
    flush()
    return "".join(out)


def crops_grid(images: np.ndarray, pad: int = 4) -> Image.Image:
    """[5, 3, S, S] normalised crops -> one RGB image: the 2x2 tiles, then the whole view."""
    S = images.shape[-1]
    u8 = np.clip((images * 0.5 + 0.5) * 255 + 0.5, 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
    grid = Image.new("RGB", (3 * S + 4 * pad, 2 * S + 3 * pad), "white")
    for k in range(4):
        y, x = divmod(k, 2)
        grid.paste(Image.fromarray(u8[k]), (pad + x * (S + pad), pad + y * (S + pad)))
    grid.paste(Image.fromarray(u8[4]), (3 * pad + 2 * (S + pad) - pad, pad + (S + pad) // 2))
    ImageDraw.Draw(grid).text((3 * pad + 2 * (S + pad) - pad, pad), "whole", fill="black")
    return grid


def preview(source, processor: SampleProcessor, *, index: int = 0, rid: str | None = None,
            out_png: str | None = None) -> str:
    if rid is not None:
        for i in range(len(source)):
            item = source[i]
            try:
                if record_id(parse_record(item["payload"], item["key"]), item["key"]) == rid:
                    index = i
                    break
            except Exception:  # noqa: BLE001 - unparseable records cannot match an id
                continue
        else:
            raise InputError(f"no record with id {rid!r}")
    if not 0 <= index < len(source):
        raise InputError(f"index {index} out of range (0..{len(source) - 1})")
    s = processor(source[index])
    if isinstance(s, Skipped):
        return f"record {s.id}: SKIPPED ({s.reason}) {s.detail}"
    tok = processor.tok
    ids, labels = s["input_ids"], s["labels"]
    lines = [f"id: {s['id']}   has_image: {bool(s['has_image'])}   tokens: {len(ids)}   "
             f"supervised: {int((labels >= 0).sum())}   questions: {int((labels == INSTRUCT_INDEX).sum())}",
             "--- prompt ([[supervised]], <<INSTRUCT>> = question end) ---",
             render_tokens(tok, ids, labels),
             "--- instructs ---", tok.decode(s["instructs"]) if s["has_image"] else "[0] (text-only)"]
    if s["repairs"]:
        lines.append(f"--- repairs: {', '.join(s['repairs'])}")
    if out_png:
        crops_grid(s["images"]).save(out_png)
        lines.append(f"--- crops: {out_png}")
    return "\n".join(lines)
