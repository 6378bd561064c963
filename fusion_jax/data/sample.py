"""One record -> one model-ready sample (or a counted skip): the per-sample map of the pipeline.

Shared by training, `check` and `preview`, so what the checker reports is what training sees.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from fusion_jax.data import images as img_lib
from fusion_jax.data.records import Skip, conversation_rounds, parse_record, record_id
from fusion_jax.data.templates import encode_conversation, get_template


@dataclasses.dataclass(frozen=True)
class Skipped:
    """Placeholder flowing through the pipeline in place of a bad record (so it gets counted)."""
    reason: str
    id: str
    detail: str = ""


class StrictModeError(RuntimeError):
    pass


@dataclasses.dataclass
class SampleConfig:
    template: str = "phi_3"
    image_size: int = 384
    num_image_tokens: int = 729
    max_length: int | None = 4096          # after placeholder expansion (model_max_length)
    query_lens: tuple[int, ...] = (4, 16, 36, 64, 144)
    max_questions: int | None = 16
    max_instruct_len: int | None = 512
    max_pixels: int = img_lib.DEFAULT_MAX_PIXELS
    max_file_bytes: int = img_lib.DEFAULT_MAX_FILE_BYTES
    exif_transpose: bool = True
    decode_images: bool = True             # False: validate text only (images as zeros)
    strict: bool = False


class SampleProcessor:
    """Callable record-dict -> sample dict | Skipped. Picklable for grain workers."""

    def __init__(self, tokenizer, config: SampleConfig, image_folder: str | None = None):
        self.tok, self.cfg, self.image_folder = tokenizer, config, image_folder
        self.template = get_template(config.template)

    def __call__(self, item: dict):
        key = item.get("key", "?")
        rid = key
        try:
            rec = parse_record(item["payload"], key)
            rid = record_id(rec, key)
            if item.get("image_error") and rec.get("image") is not None:
                reason, _, detail = item["image_error"].partition(": ")
                raise img_lib.ImageError(reason, detail)
            return self._process(rec, rid, item.get("image_folder") or self.image_folder,
                                 image_bytes=item.get("image_bytes"))
        except (Skip, img_lib.ImageError) as e:
            if self.cfg.strict:
                raise StrictModeError(f"record {rid} ({key}): {e}") from e
            return Skipped(e.reason, rid, e.detail)
        except Exception as e:  # noqa: BLE001 - bad input must never stop training; counted instead
            if self.cfg.strict:
                raise StrictModeError(f"record {rid} ({key}): {type(e).__name__}: {e}") from e
            return Skipped("unexpected_error", rid, f"{type(e).__name__}: {e}")

    def _process(self, rec: dict, rid: str, image_folder, image_bytes=None) -> dict:
        cfg = self.cfg
        has_image = "image" in rec and rec["image"] is not None
        if self.template.style == "plain" and not has_image:
            raise Skip("bad_image_tag", f"{rid}: plain template needs an image record")
        if has_image and image_bytes is None and not isinstance(rec["image"], str):
            raise Skip("bad_value", f"{rid}: image field is {type(rec['image']).__name__}, not a path")
        rounds, repairs = conversation_rounds(rec, has_image=has_image, max_questions=cfg.max_questions,
                                              key=rid)
        if self.template.style == "plain":
            if len(rounds) != 1:
                raise Skip("broken_conversation", f"{rid}: plain template needs exactly one round")
        enc = encode_conversation(self.tok, self.template, rounds, has_image=has_image)
        instructs = enc["instructs"]
        if cfg.max_instruct_len and instructs.shape[0] > cfg.max_instruct_len:
            instructs = instructs[:cfg.max_instruct_len]
            repairs.append("instructs_truncated")
        if not self._learnable(enc["input_ids"], enc["labels"]):
            raise Skip("nothing_to_learn", f"{rid}: no supervised token within max_length={cfg.max_length}")
        if has_image:
            images = self._load_image(rec["image"], image_folder, image_bytes, rid)
        else:
            images = img_lib.zero_crops(cfg.image_size)
        return {"id": rid, "input_ids": enc["input_ids"].astype(np.int32),
                "labels": enc["labels"].astype(np.int32), "instructs": instructs.astype(np.int32),
                "images": images, "has_image": np.bool_(has_image), "repairs": tuple(repairs)}

    def _learnable(self, ids, labels) -> bool:
        """Some label >= 0 survives truncation even at the largest query_len of the config."""
        if self.cfg.max_length is None:
            return bool((labels >= 0).any())
        from fusion_jax.layout import layout_sample  # model-core module; imported lazily
        lay = layout_sample(ids, labels, num_image_tokens=self.cfg.num_image_tokens,
                            query_len=max(self.cfg.query_lens), max_length=self.cfg.max_length)
        return bool((lay.labels >= 0).any())

    def _load_image(self, rel, image_folder, image_bytes, rid):
        cfg = self.cfg
        if not cfg.decode_images:
            if image_bytes is None:  # still check the path and the file's presence
                img_lib.read_image_file(img_lib.resolve_image_path(image_folder, rel), cfg.max_file_bytes)
            return img_lib.zero_crops(cfg.image_size)
        if image_bytes is None:
            path = img_lib.resolve_image_path(image_folder, rel)
            image_bytes, name = img_lib.read_image_file(path, cfg.max_file_bytes), path
        else:
            name = f"{rid}:{rel}"
        pil = img_lib.decode_image(image_bytes, max_pixels=cfg.max_pixels,
                                   exif_transpose=cfg.exif_transpose, name=name)
        return img_lib.static_hd_crops(pil, cfg.image_size)
