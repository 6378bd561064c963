"""Load an HF tokenizer folder offline with `tokenizers` (no transformers import in workers).

The reference calls `tokenizer(text).input_ids`, so BOS/EOS follow the tokenizer's config:
`add_bos_token` / `add_eos_token` from tokenizer_config.json when present, else the
tokenizer.json post-processor. `<vision_start>` / `<vision_end>` are added as special tokens
when missing, at the next free ids, as the reference's `initialize_vision_tokenizer` does.
"""
from __future__ import annotations

import json

import tokenizers
from etils import epath

from fusion_jax.constants import DEFAULT_IM_END_TOKEN, DEFAULT_IM_START_TOKEN

# the special tokens a trained BPE starts with: unk/bos/eos and the chat templates' tags
SPECIAL = ["<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>",
           "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|im_end|>"]


def _token_str(value):
    if isinstance(value, dict):
        return value.get("content")
    return value


class TextTokenizer:
    """Picklable wrapper exposing what the data pipeline needs: ids with char offsets."""

    def __init__(self, tok: tokenizers.Tokenizer, *, bos_token=None, eos_token=None, pad_token=None,
                 add_bos: bool | None = None, add_eos: bool | None = None, name: str = ""):
        self.tok = tok
        self.name = name
        self.bos_id = tok.token_to_id(bos_token) if bos_token else None
        self.eos_id = tok.token_to_id(eos_token) if eos_token else None
        pad = tok.token_to_id(pad_token) if pad_token else None
        # The reference pads phi with <unk>=0; 0 is also the fallback used by the collator.
        self.pad_id = 0 if pad is None else pad
        self.add_bos, self.add_eos = add_bos, add_eos

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str):
        return self.tok.token_to_id(token)

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """`tokenizer(text).input_ids` plus char offsets (special tokens added here get (0, 0))."""
        if self.add_bos is None and self.add_eos is None:
            enc = self.tok.encode(text, add_special_tokens=True)
            return list(enc.ids), [tuple(o) for o in enc.offsets]
        enc = self.tok.encode(text, add_special_tokens=False)
        ids, offs = list(enc.ids), [tuple(o) for o in enc.offsets]
        if self.add_bos and self.bos_id is not None:
            ids, offs = [self.bos_id] + ids, [(0, 0)] + offs
        if self.add_eos and self.eos_id is not None:
            ids, offs = ids + [self.eos_id], offs + [(len(text), len(text))]
        return ids, offs

    def __call__(self, text: str) -> list[int]:
        return self.encode_with_offsets(text)[0]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.tok.decode([int(i) for i in ids if i >= 0], skip_special_tokens=skip_special_tokens)


def load_tokenizer(path: str, *, add_vision_tokens: bool = True) -> TextTokenizer:
    """Read tokenizer.json (+ tokenizer_config.json, special_tokens_map.json) from a folder."""
    folder = epath.Path(path)
    if not (folder / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{path}: no tokenizer.json (a fast HF tokenizer folder is required)")
    tok = tokenizers.Tokenizer.from_str((folder / "tokenizer.json").read_text(encoding="utf-8"))
    cfg = {}
    for fname in ("special_tokens_map.json", "tokenizer_config.json"):  # config wins
        fp = folder / fname
        if fp.is_file():
            try:
                cfg.update(json.loads(fp.read_text(encoding="utf-8")))
            except json.JSONDecodeError as e:
                raise ValueError(f"{fp}: not valid JSON ({e})") from e
    if add_vision_tokens:
        missing = [t for t in (DEFAULT_IM_START_TOKEN, DEFAULT_IM_END_TOKEN) if tok.token_to_id(t) is None]
        if missing:
            tok.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False)
                                    for t in missing])
    return TextTokenizer(
        tok, bos_token=_token_str(cfg.get("bos_token")), eos_token=_token_str(cfg.get("eos_token")),
        pad_token=_token_str(cfg.get("pad_token")) or _token_str(cfg.get("unk_token")),
        add_bos=cfg.get("add_bos_token"), add_eos=cfg.get("add_eos_token"), name=folder.name)


def write_tokenizer_folder(tok, path: str, *, add_bos: bool = True) -> str:
    """Save a trained `tokenizers.Tokenizer` as an HF tokenizer folder (json + config + map)."""
    folder = epath.Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.json").write_text(tok.to_str(pretty=True))
    cfg = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<unk>",
           "add_bos_token": add_bos, "add_eos_token": False, "model_max_length": 4096}
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    (folder / "special_tokens_map.json").write_text(
        json.dumps({k: cfg[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}))
    return path


def train_bpe(texts, vocab_size: int, special_tokens=SPECIAL) -> tokenizers.Tokenizer:
    """A byte-level BPE trained in memory on an iterable of strings (save it with write_tokenizer_folder)."""
    from tokenizers import decoders, models, pre_tokenizers, trainers
    tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special_tokens),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return tok
