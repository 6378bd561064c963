"""Same-machine PyTorch baseline for `bench_small.py --torch-baseline`.

Why: the reference numbers in ../shared/perf/small_config.json were recorded on another CPU (Zen 4
with AVX-512); the project measures speed as a ratio against a baseline run in the same process on
the same machine. The official FUSION code is not available here, so this rebuilds the reference's
dominant compute from HF `transformers` PyTorch modules (random weights, float32, eager attention,
the exact sizes of the JSON's `configuration`):

  train step (batch 2): SigLIP text-guided pass (729 patches + 60 instruct embeddings through the 26
  kept encoder layers), SigLIP global pass on 8 crops, mlp2x_gelu projector on 3-layer features,
  Phi3ForCausalLM on 2 x 1024 spliced embeddings (729 image + 16 latent + 279 text) with 328
  supervised targets, loss.backward() into ALL parameters.
  generation (batch 1): the same passes for 1 main view (64 instructs) + 4 crops, projector, then
  Phi3ForCausalLM.generate(inputs_embeds=[1, 1024, 512]) for 32 greedy tokens with the KV cache.

LOWER BOUND: FUSION's 3 interaction layers (VisionTokenSampler), the latent refinement and the DSM
auxiliary loss are omitted, so this takes LESS time than the reference would on this machine, and
a speedup measured against it UNDERSTATES the speedup against the real reference.
"""
from __future__ import annotations

import copy
import gc
import os

import torch
import torch.nn.functional as F

N_LATENT = 16   # q = 16 latent tokens per sample (query_len "16")
SEQ = 1024      # spliced sequence length of both workloads
TARGETS = 164   # supervised positions per sample (2 x 164 = the reference's 328)


def build(ref: dict, smoke=False):
    """(vision, projector, llm) with the JSON's sizes; smoke=True keeps 2 layers in each tower."""
    from transformers import Phi3Config, Phi3ForCausalLM, SiglipVisionConfig, SiglipVisionModel
    c = ref["configuration"]
    vt, fj = c["vision_tower"]["config"], c["full_config_json"]
    # the reference deletes the last of the 27 SigLIP layers and replaces the head by Identity
    vis_layers = 2 if smoke else vt["num_hidden_layers"] - 1
    vision = SiglipVisionModel(SiglipVisionConfig(
        hidden_size=vt["hidden_size"], intermediate_size=vt["intermediate_size"],
        num_hidden_layers=vis_layers, num_attention_heads=vt["num_attention_heads"],
        num_channels=vt["num_channels"], image_size=vt["image_size"], patch_size=vt["patch_size"],
        hidden_act=vt["hidden_act"], layer_norm_eps=vt["layer_norm_eps"], attention_dropout=0.0,
        vision_use_head=False, attn_implementation="eager"))
    D = fj["hidden_size"]
    # mlp2x_gelu on 3 concatenated tower features (mm_hidden_size 128 -> 384 inputs)
    projector = torch.nn.Sequential(torch.nn.Linear(3 * fj["mm_hidden_size"], D), torch.nn.GELU(),
                                    torch.nn.Linear(D, D))
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads",
            "num_key_value_heads", "hidden_act", "max_position_embeddings",
            "original_max_position_embeddings", "rms_norm_eps", "rope_theta", "rope_scaling",
            "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id")
    llm = Phi3ForCausalLM(Phi3Config(   # deepcopy: Phi3Config edits the rope dict in place
        **{k: copy.deepcopy(fj[k]) for k in keys},
        num_hidden_layers=2 if smoke else fj["num_hidden_layers"],
        resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0, attn_implementation="eager"))
    assert llm.model.rotary_emb.rope_type == "longrope", llm.model.rotary_emb.rope_type
    return vision, projector, llm


def features(hs):
    """FUSION's connector input: last layer output ++ mean of the inputs of the first half of the
    layers ++ mean of the inputs of the second half (as fusion_jax.vision computes it)."""
    k = (len(hs) - 1) // 2
    return torch.cat([hs[-1], torch.stack(hs[:k]).mean(0), torch.stack(hs[k:2 * k]).mean(0)], -1)


def text_guided(vision, pixels, instruct):
    """Patches ++ instruct embeddings through the encoder layers. In transformers 5.x
    SiglipEncoder no longer returns hidden states (output_hidden_states is collected by a decorator
    on the top-level model only), so the layers are run here one by one."""
    h = torch.cat([vision.embeddings(pixels), instruct], 1)
    hs = [h]
    for layer in vision.encoder.layers:
        h = layer(h, None)
        hs.append(h)
    return features(hs)[:, :_patches(vision)]   # the instruct rows feed only omitted layers


def _patches(vision):
    return (vision.config.image_size // vision.config.patch_size) ** 2


def global_latents(vision, projector, crops, B):
    """Global pass through the whole SigLIP model, projected, max-pooled to 16 latents per sample
    (a 1-D stand-in for FUSION's stitched 2-D adaptive max pool; negligible cost either way)."""
    hs = vision(pixel_values=crops, output_hidden_states=True).hidden_states
    g = projector(features(list(hs))).reshape(B, -1, projector[-1].out_features)
    return F.adaptive_max_pool1d(g.transpose(1, 2), N_LATENT).transpose(1, 2)


def spliced(models, pixels, crops, instruct, text_ids):
    """[B, 1024, D] = text[:40] ++ latents ++ image ++ text[40:] (bench_small's layout order)."""
    vision, projector, llm = models
    B = pixels.shape[0]
    img = projector(text_guided(vision, pixels, instruct))
    lat = global_latents(vision, projector, crops, B)
    txt = llm.get_input_embeddings()(text_ids)
    return torch.cat([txt[:, :40], lat, img, txt[:, 40:]], 1)


def inputs(models, B, n_instruct, crops_per_sample, gen):
    vision, _, llm = models
    px, V = vision.config.image_size, llm.config.vocab_size
    n_text = SEQ - _patches(vision) - N_LATENT
    x = dict(pixels=torch.rand(B, 3, px, px) * 2 - 1,
             crops=torch.rand(B * crops_per_sample, 3, px, px) * 2 - 1,
             # stands in for aux_projector(embed(question tokens)); a leaf that needs grad in training
             instruct=torch.randn(B, n_instruct, vision.config.hidden_size, requires_grad=not gen),
             text_ids=torch.randint(3, V, (B, n_text)))
    if not gen:
        labels = torch.full((B, SEQ), -100)
        labels[:, -TARGETS:] = torch.randint(3, V, (B, TARGETS))
        x["labels"] = labels
    return x


def bench(ref: dict, timer, warmup=2, steps=5, gen_runs=5, new_tokens=32, train=True,
          generate=True, smoke=False, log=print) -> dict:
    """Times the workloads with `timer` (bench_small._time conventions); frees the models after."""
    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count())
    crops = 1 if smoke else 4               # global crops per sample (static_hd: 4 + 1 main view)
    models = build(ref, smoke)
    vision, projector, llm = models
    params = [p for m in models for p in m.parameters()]
    res = {"torch": torch.__version__, "threads": torch.get_num_threads(), "smoke": smoke,
           "n_params": sum(p.numel() for p in params), "lower_bound": True}
    if train:
        for m in models:
            m.train()
        x = inputs(models, 2, 60, crops, gen=False)

        def step():
            emb = spliced(models, x["pixels"], x["crops"], x["instruct"], x["text_ids"])
            loss = llm(inputs_embeds=emb, labels=x["labels"]).loss
            loss.backward()
            res["loss"] = loss.item()

        def zero():  # untimed, like the reference's zero_grad before each step
            for m in models:
                m.zero_grad(set_to_none=True)
            x["instruct"].grad = None

        res["train_step"] = timer(step, warmup, steps, before=zero)
        zero()
        log(f"torch baseline train step (fwd+bwd, fp32, eager, {res['threads']} threads, "
            f"{res['n_params']:,} params, LOWER BOUND: no interaction layers / DSM loss): median "
            f"{res['train_step']['median_s']:.3f} s over {steps} | loss {res['loss']:.4f}")
    if generate:
        for m in models:
            m.eval()
        x = inputs(models, 1, 64, crops, gen=True)

        @torch.no_grad()
        def gen():
            emb = spliced(models, x["pixels"], x["crops"], x["instruct"], x["text_ids"])
            # transformers 5.x: inputs_embeds without input_ids is supported for decoder-only
            # models and returns only the new tokens
            out = llm.generate(inputs_embeds=emb, max_new_tokens=new_tokens,
                               min_new_tokens=new_tokens, do_sample=False, use_cache=True)
            assert out.shape == (1, new_tokens), out.shape

        r = timer(gen, 1, gen_runs)
        r["tokens_per_s"] = new_tokens / r["median_s"]
        res["generate"] = r
        log(f"torch baseline generate {new_tokens} tokens (greedy, end to end, LOWER BOUND): median "
            f"{r['median_s']:.3f} s = {r['tokens_per_s']:.1f} tok/s over {gen_runs}")
    del vision, projector, params
    models = llm = None  # frees them too: the closures above hold these two
    gc.collect()
    return res
