"""The full FUSION model: TUNE encoder, static-shape splicing, decoder with CARD, DSM loss.

Module tree mirrors the reference's `FusionXxxForCausalLM` (`model.embed_tokens`,
`model.layers`, `model.vision_tower`, `model.mm_projector`, `model.aux_projector`,
`model.vision_sampler_layers`, `lm_head`) so that `param_map` is a table.
Layers are stored stacked (leading layer axis) and run under `lax.scan`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fusion_jax.config import FusionConfig
from fusion_jax.constants import MAIN_VIEW, NUM_TILES
from fusion_jax.interaction import InteractionLayer, context_windows
from fusion_jax.llm import DecoderLayer, causal_keep, rope_cos_sin
from fusion_jax.loss import chunked_cross_entropy, cross_entropy, dsm_loss, objective
from fusion_jax.nn import Embed, Linear, Projector, RMSNorm, dtype_of, scan_layers, scanned
from fusion_jax.sharding import constrain
from fusion_jax.vision import SiglipVisionTower, adaptive_max_pool2d, resize_tokens, stitch_tiles


class FusionModel(nnx.Module):
    def __init__(self, cfg: FusionConfig, rngs: nnx.Rngs):
        c, v = cfg.llm, cfg.vision
        dt = dict(param_dtype=cfg.param_dtype, dtype=cfg.compute_dtype)
        kw = dict(dt, linear_2d=cfg.linear_2d)
        self.embed_tokens = Embed(c.vocab_size, c.hidden_size, rngs=rngs, std=cfg.embed_init_std, **dt)
        self.layers = scanned(DecoderLayer(c, stack=(c.num_hidden_layers,), rngs=rngs,
                                           attn_impl=cfg.attention_impl, **kw))
        self.norm = RMSNorm(c.hidden_size, eps=c.rms_norm_eps, **dt)
        self.vision_tower = SiglipVisionTower(v, rngs=rngs, early_mask_mode=cfg.early_mask_mode,
                                              remat_policy=cfg.vision_remat_policy or cfg.remat_policy,
                                              scan=cfg.scan_layers, attn_impl=cfg.attention_impl, **kw)
        d = cfg.projector_depth
        self.mm_projector = Projector(3 * v.hidden_size, c.hidden_size, d, rngs=rngs,
                                      axes_in=("vision_mlp", "embed"), axes_out=("mlp", "embed"), **kw)
        self.aux_projector = Projector(c.hidden_size, v.hidden_size, d, rngs=rngs,
                                       axes_in=("embed", "vision_embed"),
                                       axes_out=("vision_mlp", "vision_embed"), **kw)
        n = cfg.num_sampler_layers if cfg.use_card else 0
        # CARD's interaction layers, under the reference's parameter name
        self.vision_sampler_layers = (InteractionLayer(c.hidden_size, cfg.sampler_heads, stack=(n,),
                                                       rngs=rngs, attn_impl=cfg.attention_impl, **kw)
                                      if n else None)


class FusionForCausalLM(nnx.Module):
    def __init__(self, cfg: FusionConfig, *, rngs: nnx.Rngs | None = None, seed: int = 0):
        rngs = rngs or nnx.Rngs(seed)
        self.cfg = cfg
        self.model = FusionModel(cfg, rngs)
        c = cfg.llm
        self.lm_head = (None if c.tie_word_embeddings else
                        Linear(c.hidden_size, c.vocab_size, use_bias=False, axes=("embed", "vocab"),
                               rngs=rngs, param_dtype=cfg.param_dtype, dtype=cfg.compute_dtype,
                               linear_2d=cfg.linear_2d))

    # ------------------------------------------------------------------ vision side
    def encode(self, batch, query_len: int):
        """Vision features, DSM pairs and latent inits for a laid-out batch."""
        cfg, m = self.cfg, self.model
        v = cfg.vision
        n_patch = v.num_patches
        images = batch["images"].astype(dtype_of(cfg.compute_dtype))
        B = images.shape[0]
        instructs = batch["instructs"]
        instruct_mask = batch.get("instruct_mask", instructs != 0)
        ins_emb = m.embed_tokens(instructs)
        out = {"instruct_embeddings": ins_emb, "instruct_mask": instruct_mask}
        if cfg.use_tune:
            states = m.aux_projector(ins_emb)
            feats, hs0, _ = m.vision_tower(images[:, MAIN_VIEW], states, instruct_mask)
            proj = m.mm_projector(feats)
            out["image_features"], out["instruct_features"] = proj[:, :n_patch], proj[:, n_patch:]
        else:
            feats, hs0, _ = m.vision_tower(images[:, MAIN_VIEW])
            out["image_features"], out["instruct_features"] = m.mm_projector(feats), None
        out["vision_embeddings"] = hs0[:, :n_patch]
        out["vision_features"] = m.aux_projector(out["image_features"])

        tiles = images[:, :NUM_TILES].reshape((B * NUM_TILES,) + images.shape[2:])
        gfeats, _, _ = m.vision_tower(tiles)
        gmap = stitch_tiles(m.mm_projector(gfeats).reshape(B, NUM_TILES, n_patch, -1), v.grid)
        s = int(round(query_len ** 0.5))
        D = gmap.shape[-1]
        out["global_map"] = gmap
        out["init_latent"] = adaptive_max_pool2d(gmap, s).reshape(B, s * s, D)
        g = s * cfg.window_size
        out["global_ctx"] = adaptive_max_pool2d(gmap, g).reshape(B, g * g, D)
        if cfg.image_token_grid:
            out["image_features"] = resize_tokens(out["image_features"], v.grid, cfg.image_token_grid)
        return out

    def splice(self, batch, enc):
        """Text embeddings with image tokens and latent blocks scattered at the layout positions."""
        m = self.model
        ids, mask = batch["token_ids"], batch["attention_mask"]
        B, S = ids.shape
        x = m.embed_tokens(ids) * mask[..., None].astype(dtype_of(self.cfg.compute_dtype))
        bidx = jnp.arange(B)[:, None]
        ipos = batch["image_pos"]
        x = x.at[bidx, jnp.where(ipos >= 0, ipos, S)].set(enc["image_features"].astype(x.dtype),
                                                          mode="drop")
        # every latent block gets the initial latents, refined or not (eval convention)
        lpos = batch["latent_fill_pos"] if "latent_fill_pos" in batch else batch["latent_pos"]
        q = enc["init_latent"].shape[1]
        lat = jnp.tile(enc["init_latent"], (1, lpos.shape[1] // q, 1))
        lat = lat * batch["has_image"][:, None, None].astype(lat.dtype)
        x = x.at[bidx, jnp.where(lpos >= 0, lpos, S)].set(lat.astype(x.dtype), mode="drop")
        return constrain(x, "batch", None, None)

    # ------------------------------------------------------------------ decoder
    def decode(self, x, batch, windows, *, cache=None, cache_index=None, keep=None,
               position_ids=None, collect=False):
        """Decoder layers with interaction layers after `cfg.interaction_after` (full pass only)."""
        cfg, m = self.cfg, self.model
        S = x.shape[1]
        pos = batch["position_ids"] if position_ids is None else position_ids
        cos, sin = rope_cos_sin(cfg.llm, pos, x.dtype,
                                valid=batch["attention_mask"] if position_ids is None else None)
        if keep is None:
            keep = causal_keep(batch["attention_mask"])
        after = cfg.interaction_after if (S > 1 and windows is not None) else ()
        which = np.full((cfg.llm.num_hidden_layers,), -1, np.int32)   # interaction layer after decoder layer i
        for k, i in enumerate(after):
            which[i] = k
        interaction = nnx.split(m.vision_sampler_layers) if after else None
        B, D = x.shape[0], x.shape[2]
        lq = batch["latent_pos"].shape[1] if after else 0

        def interact(h, k):
            gdi, sti = interaction
            layer = nnx.merge(gdi, jax.tree.map(lambda a: a[k], sti))
            h, refined = layer(h, batch["instruct_pos"], batch["latent_pos"], windows)
            return constrain(h, "batch", None, None), refined.astype(h.dtype)

        def skip(h, _):
            return h, jnp.zeros((B, lq, D), h.dtype)

        def body(layer, c, inp):
            kv, k = inp
            h, kv = layer(c, cos, sin, keep, kv, cache_index)
            h = constrain(h, "batch", None, None)
            refined = None
            if after:
                if isinstance(k, (int, np.integer)):   # unrolled: static choice
                    h, refined = interact(h, int(k)) if k >= 0 else skip(h, k)
                else:                                   # scanned: one program for all layers
                    h, refined = jax.lax.cond(k >= 0, interact, skip, h, jnp.maximum(k, 0))
            return h, (kv, c if collect else None, refined if collect else None)

        x, (new_cache, hs, refined) = scan_layers(m.layers, body, x, (cache, which), unroll=not cfg.scan_layers,
                                                  remat_policy=cfg.remat_policy)
        x = m.norm(x)
        aux = {}
        if collect:
            aux["layer_inputs"] = hs
            aux["interaction_outputs"] = refined[np.asarray(after)] if after else None
        return x, (new_cache if cache is not None else None), aux

    def logits(self, h):
        if self.lm_head is None:
            out = self.model.embed_tokens.attend(h)
        else:
            out = self.lm_head(h)
        return out.astype(jnp.float32)

    # ------------------------------------------------------------------ full forward
    def __call__(self, batch, *, return_intermediates: bool = False, return_logits: bool = True):
        """Training/prefill forward on a laid-out batch (see `fusion_jax.layout`).

        Returns logits, loss, ce_loss, instruct_cos_loss, vision_cos_loss, dsm_loss
        (and intermediates on request). `return_logits=False` (the train step) computes the
        CE in chunks of `cfg.loss_chunk` target rows and returns no logits: same loss and
        gradients, without the [B, S, V] tensor or the head's work on non-target rows.
        """
        cfg = self.cfg
        q = batch["latent_pos"].shape[1] // batch["instruct_pos"].shape[1]
        enc = self.encode(batch, q)
        x = self.splice(batch, enc)
        windows = (context_windows(enc["global_ctx"], q, cfg.window_size)
                   if self.model.vision_sampler_layers is not None else None)
        h, _, aux = self.decode(x, batch, windows, collect=return_intermediates)
        has_labels = "labels" in batch and batch["labels"] is not None
        if return_logits or not has_labels:
            logits = self.logits(h)
            out = {"logits": logits}
        else:
            out = {}
        if has_labels and not return_logits:
            ce, n = chunked_cross_entropy(h, batch["labels"], self.logits, cfg.loss_chunk,
                                          cfg.ce_skip_empty_chunks)
        elif has_labels:
            ce, n = cross_entropy(logits, batch["labels"])
        else:
            ce, n = jnp.float32(0.0), jnp.int32(0)
        ins, vis = dsm_loss(enc["instruct_embeddings"], enc["instruct_features"],
                            enc["instruct_mask"], enc["vision_embeddings"], enc["vision_features"])
        loss, parts = objective(cfg, ce, ins, vis)
        out.update(loss=loss, num_targets=n, **parts)
        if return_intermediates:
            out.update(enc)
            out["inputs_embeds"] = x
            out["last_hidden_state"] = h
            out.update(aux)
        return out
