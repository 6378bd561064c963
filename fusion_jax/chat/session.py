"""A multi-turn chat whose KV cache is reused across turns.

Each turn renders the whole conversation with the chat instruct convention (INSTRUCT on the
last token of every user turn's assistant header, a latent block per user turn), lays it
out, and prefills only the positions the cache does not hold yet (`decoding.extend`): the
previous answer's end and the new question. That equals a full prefill of the conversation
when
  * the cache is kept up to the longest common prefix of the cached ids and the re-tokenized
    conversation (when the answer text does not tokenize back to the generated ids, the
    answer is prefilled again from the first difference); a full prefill happens only when
    that prefix ends before the last question's instruct position,
  * the vision side is the one computed at the first turn: the image features depend on the
    vision instructs, which are fixed to the first user message here.
The reference's `serve/cli.py` instead re-encodes everything each turn with the instructs of
all user messages concatenated, so with `use_tune` its image features change every turn;
`reencode=True` reproduces that (a full prefill per turn, no reuse).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np

from fusion_jax.generate import decoding
from fusion_jax.generate.prompts import (
    GenerationConfig,
    decode_outputs,
    default_template,
    encode_request,
    layout_padded,
    load_image_crops,
    pick_query_len,
    round_up,
    stop_strings,
    stop_token_ids,
)
from fusion_jax.layout import spliced_length

SEG_KEYS = ("token_ids", "attention_mask", "image_pos", "latent_pos", "latent_fill_pos", "instruct_pos")


def fixed_instructs(tokenizer, first_question: str, has_image: bool) -> np.ndarray:
    """The vision instructs of a one-question conversation (what the first turn encodes)."""
    from fusion_jax.data.templates import strip_tags
    from fusion_jax.generate.prompts import image_question
    if not has_image:
        return np.zeros(1, np.int64)
    ids = np.asarray(tokenizer(strip_tags(image_question(first_question))), np.int64)
    return ids if ids.size else np.zeros(1, np.int64)


def conversation_batch(model, tokenizer, turns, image, gcfg: GenerationConfig, *, reencode: bool = False):
    """(raw ids, laid-out batch) of the conversation `turns` (last answer None), chat convention;
    instructs fixed to the first question unless `reencode` (then: all questions, as the reference)."""
    cfg = model.cfg
    tmpl = gcfg.template or default_template(cfg)
    enc = encode_request(tokenizer, tmpl, turns, has_image=image is not None, convention="chat")
    ins = enc["instructs"] if reencode else fixed_instructs(tokenizer, turns[0][0], image is not None)
    pad = int(getattr(tokenizer, "pad_id", 0) or 0)
    lay = layout_padded(cfg, [enc["input_ids"]], [ins], load_image_crops(cfg, image)[None],
                        labels=[enc["labels"]], query_len=gcfg.query_len, seq_bucket=0, pad_id=pad,
                        max_new_tokens=gcfg.max_new_tokens)
    return enc["input_ids"], lay


def _common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """Length of the longest common prefix, less one so that at least one token is new."""
    n = min(a.shape[0] - 1, b.shape[0])
    diff = np.nonzero(a[:n] != b[:n])[0]
    return int(diff[0]) if diff.size else n



def segment(lay: dict, start: int, q: int, bucket: int):
    """The positions start.. of a one-sample layout, relative to `start`, padded to a bucket;
    None when a latent block refined in the segment lies before it (no exact extension)."""
    n = int(lay["attention_mask"][0].sum())
    S = round_up(max(n - start, 1), bucket)
    ins = lay["instruct_pos"][0]
    lat = lay["latent_pos"][0].reshape(-1, q)
    new = ins >= start
    if (lat[new] < start).any() or (start and (lay["image_pos"][0] >= start).any()):
        return None

    def rel(a, width):
        a = a[(a >= start)] - start
        return np.pad(a, (0, width - a.shape[0]), constant_values=-1)[None].astype(np.int32)

    n_q = max(int(new.sum()), 1)
    seg = {"token_ids": np.zeros((1, S), np.int32), "attention_mask": np.zeros((1, S), bool),
           "image_pos": rel(lay["image_pos"][0], lay["image_pos"].shape[1]),
           "latent_pos": rel(lat[new].reshape(-1), n_q * q), "instruct_pos": rel(ins[new], n_q),
           "has_image": lay["has_image"]}
    fill = lay["latent_fill_pos"][0]
    seg["latent_fill_pos"] = rel(fill[fill >= start], round_up(max(int((fill >= start).sum()), q), q))
    seg["token_ids"][0, :n - start] = lay["token_ids"][0, start:n]
    seg["attention_mask"][0, :n - start] = True
    return seg


@dataclass
class ChatSession:
    """Conversation state: turns, image, and the KV cache of the tokens seen so far."""
    model: object
    tokenizer: object
    gcfg: GenerationConfig
    image: object = None
    reencode: bool = False
    seq_bucket: int = 64
    turns: list = field(default_factory=list)
    stats: dict = field(default_factory=lambda: {"extended": 0, "full": 0})

    def __post_init__(self):
        cfg = self.model.cfg
        self.q = pick_query_len(cfg, self.gcfg.query_len)
        self.tmpl = self.gcfg.template or default_template(cfg)
        ctx = cfg.max_length or cfg.llm.max_position_embeddings
        self.capacity = round_up(ctx + self.gcfg.max_new_tokens + self.seq_bucket + 1, self.seq_bucket)
        self.eos = set(stop_token_ids(cfg, self.tokenizer, self.tmpl))
        self.stops = stop_strings(self.tmpl) if self.gcfg.stop is None else tuple(self.gcfg.stop)
        self.reset()

    def reset(self):
        """Forget the conversation (the image stays)."""
        self.turns, self.ids, self.filled, self.cache, self.vision = [], np.zeros(0, np.int64), 0, None, None

    def _prefill(self, ids, lay) -> jax.Array:
        """Logits of the conversation's last token, extending the cache where exact."""
        cfg = self.model.cfg
        common = _common_prefix(ids, self.ids) if (self.cache is not None and not self.reencode) else 0
        start = spliced_length(ids[:common], num_image_tokens=cfg.num_image_tokens, query_len=self.q)
        seg = segment(lay, start, self.q, self.seq_bucket) if common else None
        if seg is None:
            start, seg = 0, segment(lay, 0, self.q, self.seq_bucket)
            vis = {k_: jnp.asarray(lay[k_]) for k_ in ("images", "instructs", "instruct_mask")}
            self.vision = decoding.encode_vision(self.model, vis, query_len=self.q)
            from fusion_jax.llm import init_cache
            self.cache = init_cache(cfg.llm, 1, self.capacity, cfg.compute_dtype)
            self.kv_mask = jnp.zeros((1, self.capacity), bool)
            self.stats["full"] += 1
        else:
            self.stats["extended"] += 1
        logits, self.cache, self.kv_mask = decoding.extend(
            self.model, {k_: jnp.asarray(v) for k_, v in seg.items()}, self.vision, self.cache, self.kv_mask,
            jnp.asarray([start], jnp.int32))
        self.filled = int(lay["attention_mask"][0].sum())
        return logits

    def ask(self, question: str, on_text=None) -> str:
        """Answer `question` as the next turn; `on_text(piece)` receives the answer as it streams."""
        turns = self.turns + [(question, None)]
        ids, lay = conversation_batch(self.model, self.tokenizer, turns, self.image, self.gcfg,
                                      reencode=self.reencode)
        logits = self._prefill(ids, lay)
        g, rng, toks, shown = self.gcfg, jax.random.PRNGKey(self.gcfg.seed), [], ""
        for t in range(g.max_new_tokens):
            tok, rng, logits, self.cache, self.kv_mask = decoding.next_token(
                self.model, logits, self.cache, self.kv_mask, jnp.asarray([self.filled + t], jnp.int32), rng,
                temperature=float(g.temperature), top_k=int(g.top_k), top_p=float(g.top_p))
            toks.append(int(tok[0]))
            done = toks[-1] in self.eos
            text = self._text(toks)
            if on_text is not None and text.startswith(shown) and (done or not text[len(shown):].isspace()):
                on_text(text[len(shown):])
                shown = text
            if done:
                break
        text = self._text(toks)
        if on_text is not None and text != shown:
            on_text(text[len(shown):] if text.startswith(shown) else "\n" + text)
        self.ids = np.concatenate([ids, np.asarray(toks, np.int64)])   # every emitted token is cached
        self.filled += len(toks)
        self.turns = turns[:-1] + [(question, text)]
        return text

    def _text(self, toks) -> str:
        return decode_outputs(self.tokenizer, np.asarray([toks]), np.asarray([len(toks)]), self.stops)[0]
