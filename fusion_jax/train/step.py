"""The train step: one pure, jittable `train_step(state, batch) -> (state, metrics)`.

State is a plain pytree (so Orbax, `jax.eval_shape` and AOT lowering all see the same thing):

    {"params": pure dict of fp32 (param_dtype) arrays, "opt_state": optax state,
     "step": int32 scalar, "rng": uint32[2] key}

Gradient accumulation: the global batch [A*B, ...] is split into A interleaved micro-batches
(rows i, i+A, ...; keeps each device's rows local) and scanned. Every loss term is weighted by its
share of the global element count (targets for CE, valid instruct tokens and image tokens for
DSM), so A micro-batches give the same gradient as the one big batch.

AOT: `make_train_step` is `jax.jit` with explicit in/out shardings; `.lower(abstract args)` compiles it
ahead of time (fusion_jax.tools.aot_compile).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from fusion_jax.config import FusionConfig
from fusion_jax.constants import IGNORE_INDEX, NUM_CROPS
from fusion_jax.loss import objective

# Batch entries the model reads (the pipeline also yields ids / query_len / skip counts).
BATCH_KEYS = ("token_ids", "labels", "attention_mask", "position_ids", "image_pos", "latent_pos",
              "instruct_pos", "has_image", "instructs", "instruct_mask", "images")
BATCH_NDIM = {"token_ids": 2, "labels": 2, "attention_mask": 2, "position_ids": 2, "image_pos": 2,
              "latent_pos": 2, "instruct_pos": 2, "has_image": 1, "instructs": 2,
              "instruct_mask": 2, "images": 5}
BATCH_AXES = ("data", "fsdp")


# ----------------------------------------------------------------------------- model / state

def build_model(cfg: FusionConfig, seed: int = 0):
    if cfg.lora is not None:  # adapters on a frozen base (fusion_jax.lora)
        from fusion_jax.lora import build_model as build_lora
        return build_lora(cfg, seed)
    from fusion_jax.model import FusionForCausalLM
    return FusionForCausalLM(cfg, rngs=nnx.Rngs(seed))


def abstract_model(cfg: FusionConfig):
    return nnx.eval_shape(lambda: build_model(cfg, 0))


def _names(path) -> tuple:
    return tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))


def mirrored(path, table: dict, ok=lambda value: True):
    """`table[p]` (keyed by parameter paths) for the parameter p an optimizer-state leaf at `path`
    mirrors (Adam's mu/nu: p's path ends the leaf's) where `ok(table[p])`, else None."""
    names = _names(path)
    for i in range(len(names)):
        value = table.get(names[i:])
        if value is not None and ok(value):
            return value
    return None


def opt_state_shardings(abstract_opt_state, params_sharding: dict, mesh):
    """Optimizer leaves that mirror a parameter (Adam mu/nu) take its sharding; the rest replicate."""
    table = {_names(p): s for p, s in jax.tree_util.tree_flatten_with_path(params_sharding)[0]}
    rep = NamedSharding(mesh, PartitionSpec())

    def one(path, leaf):
        s = mirrored(path, table, lambda s: len(s.spec) <= len(getattr(leaf, "shape", ())))
        return rep if s is None else s

    return jax.tree_util.tree_map_with_path(one, abstract_opt_state)


def train_state_shardings(abstract_state: dict, params_sharding: dict, mesh, *, offload_opt: bool = False) -> dict:
    """`offload_opt`: the optimizer state lives in host memory (`pinned_host`) between steps."""
    rep = NamedSharding(mesh, PartitionSpec())
    opt = opt_state_shardings(abstract_state["opt_state"], params_sharding, mesh)
    if offload_opt:
        opt = jax.tree.map(lambda s: s.with_memory_kind("pinned_host"), opt)
    return {"params": params_sharding, "opt_state": opt, "step": rep, "rng": rep}


HOST_OFFLOAD = ("auto", "on", "off")


def resolve_host_offload(setting: str, abstract_state: dict, mesh) -> bool:
    """config.optim.host_offload: `auto` keeps the optimizer state in host memory when the fp32
    parameters and optimizer state together would take more than 40% of a device's memory (the
    rest is the step's temporaries: ~9 GiB at one 4096-token 8B sample, docs/pod_readiness.md)."""
    if setting not in HOST_OFFLOAD:
        raise ValueError(f"config.optim.host_offload={setting!r}: expected {' | '.join(HOST_OFFLOAD)}")
    if setting != "auto":
        return setting == "on"
    from fusion_jax.train.flops import hbm_bytes
    hbm = hbm_bytes(mesh.devices.flat[0])
    size = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract_state))
    return bool(hbm) and size / mesh.size > 0.4 * hbm


def init_train_state(params: dict, tx, seed: int) -> dict:
    return {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32),
            "rng": jax.random.PRNGKey(seed)}


def abstract_train_state(abstract_params: dict, tx) -> dict:
    return jax.eval_shape(lambda p: init_train_state(p, tx, 0), abstract_params)


def batch_shardings(mesh, keys=BATCH_KEYS) -> dict:
    return {k: NamedSharding(mesh, PartitionSpec(BATCH_AXES, *([None] * (BATCH_NDIM[k] - 1)))) for k in keys}


def abstract_batch(cfg: FusionConfig, batch_size: int, seq_len: int, query_len: int,
                   instruct_len: int = 64, max_questions: int = 16) -> dict:
    """ShapeDtypeStructs of one bucket's batch (for AOT lowering and FLOP counting)."""
    S, B, s = seq_len, batch_size, cfg.vision.image_size
    sds = jax.ShapeDtypeStruct
    return {"token_ids": sds((B, S), jnp.int32), "labels": sds((B, S), jnp.int32),
            "attention_mask": sds((B, S), jnp.bool_), "position_ids": sds((B, S), jnp.int32),
            "image_pos": sds((B, cfg.num_image_tokens), jnp.int32),
            "latent_pos": sds((B, max_questions * query_len), jnp.int32),
            "instruct_pos": sds((B, max_questions), jnp.int32), "has_image": sds((B,), jnp.bool_),
            "instructs": sds((B, instruct_len), jnp.int32), "instruct_mask": sds((B, instruct_len), jnp.bool_),
            "images": sds((B, NUM_CROPS, 3, s, s), jnp.float32)}


def model_batch(batch: dict) -> dict:
    """Only the arrays the model reads (drops ids, query_len, skip counts)."""
    return {k: batch[k] for k in BATCH_KEYS if k in batch}


# ----------------------------------------------------------------------------- loss

def loss_counts(batch: dict) -> dict:
    """Element counts of the three loss terms (CE targets, instruct tokens, samples): data only."""
    n_ce = jnp.sum(batch["labels"][:, 1:] != IGNORE_INDEX).astype(jnp.float32)
    n_ins = jnp.sum(batch["instruct_mask"]).astype(jnp.float32)
    n_vis = jnp.float32(batch["images"].shape[0])  # per-sample mean over patches, then over samples
    return {"ce": n_ce, "ins": n_ins, "vis": n_vis}


def micro_objective(cfg: FusionConfig, out: dict, mb: dict, totals: dict):
    """This micro-batch's share of the big-batch loss (sums to the big-batch loss)."""
    w = loss_counts(mb)

    def share(term, k):
        return out[term] * jnp.where(totals[k] > 0, w[k] / jnp.maximum(totals[k], 1.0), 0.0)

    return objective(cfg, share("ce_loss", "ce"), share("instruct_cos_loss", "ins"),
                     share("vision_cos_loss", "vis"))


# ----------------------------------------------------------------------------- step

@dataclasses.dataclass(frozen=True)
class StepOptions:
    grad_accum: int = 1
    donate: bool = True
    skip_nonfinite: bool = True   # keep the old state when loss or grad norm is NaN/Inf
    offload_opt: bool = False     # optimizer state in host memory between steps (config.optim.host_offload)


def _split_micro(x, A: int, mesh):
    y = x.reshape((x.shape[0] // A, A) + x.shape[1:])
    y = jnp.swapaxes(y, 0, 1)
    if mesh is not None:
        y = jax.lax.with_sharding_constraint(
            y, NamedSharding(mesh, PartitionSpec(None, BATCH_AXES, *([None] * (x.ndim - 1)))))
    return y


def _accumulate(grad_fn, params, frozen_params, batch, totals, A: int, mesh, key=None):
    """(loss, parts), grads summed over A interleaved micro-batches (scanned); `key`: LoRA dropout's
    step key (micro-batch i gets `_micro_key(key, i)`) or None.

    `grad_fn(params, frozen_params, mb, totals, key, g_acc) -> ((loss, parts), g_acc + grads)`."""
    micro = jax.tree.map(lambda x: _split_micro(x, A, mesh), batch)
    keys = None if key is None else jax.vmap(lambda i: _micro_key(key, i))(jnp.arange(A))

    def body(carry, xs):
        g_acc, loss_acc, parts_acc = carry
        mb, k = xs
        (loss, parts), g_acc = grad_fn(params, frozen_params, mb, totals, k, g_acc)
        return (g_acc, loss_acc + loss, jax.tree.map(jnp.add, parts_acc, parts)), None

    zeros_g = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    zeros_parts = {k: jnp.float32(0.0) for k in ("ce_loss", "instruct_cos_loss", "vision_cos_loss", "dsm_loss")}
    zeros_parts["num_targets"] = jnp.int32(0)
    (grads, loss, parts), _ = jax.lax.scan(body, (zeros_g, jnp.float32(0.0), zeros_parts), (micro, keys))
    return (loss, parts), jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)


def _micro_key(key, i):
    return None if key is None else jax.random.fold_in(key, i)


def _subtree(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def _with_subtrees(tree, subs: dict):
    """`tree` with the subtree at each path of `subs` replaced (nested dicts copied, not mutated)."""
    out = dict(tree)
    for path, sub in subs.items():
        node = out
        for k in path[:-1]:
            node[k] = dict(node[k])
            node = node[k]
        node[path[-1]] = sub
    return out


def _split_at(tree, paths):
    """(inside, outside): leaves under one of `paths` vs the others, None where the other holds them."""
    def pick(want):
        return jax.tree_util.tree_map_with_path(
            lambda p, x: x if any(_names(p)[:len(q)] == q for q in paths) == want else None, tree)
    return pick(True), pick(False)


def _forward_with_sinks(model, mb, accs):
    """The model's forward with the scanned stacks' accumulators (pure dicts under their paths in
    `accs`) in `grad_sinks`: (output, `accs` after the scans)."""
    from fusion_jax import nn
    mods = nn.scanned_modules(model)
    with nn.grad_sinks({id(m): _subtree(accs, p) for p, m in mods.items()}) as final:
        out = model(mb, return_logits=False)
    return out, _with_subtrees(accs, {p: final[id(m)] for p, m in mods.items()})


def sunk_grad_fn(loss_fn, graphdef):
    """`_accumulate`'s grad_fn: the scanned stacks' gradients go straight into the running sums
    (`fusion_jax.nn.grad_sinks`), so their fp32 gradients exist once, not twice (the micro-batch's
    and the sum). A stack run once per forward (the decoder) gets the same sums bit for bit; one run
    twice (the vision tower) adds each pass on its own, a float32 reassociation (tests/test_train.py).
    The other parameters are differentiated as usual and added.
    `loss_fn(params, frozen_params, mb, totals, key, accs)` returns ((objective, final accs), parts)."""
    from fusion_jax import nn

    def grad_fn(params, frozen_params, mb, totals, key, g_acc):
        paths = list(nn.scanned_modules(nnx.merge(graphdef, join_frozen(params, frozen_params))))
        sunk, rest = _split_at(params, paths)
        acc_sunk, acc_rest = _split_at(g_acc, paths)
        fixed = join_frozen(sunk, frozen_params)   # reached only through the sinks
        (obj, _), vjp, parts = jax.vjp(lambda r, a: loss_fn(r, fixed, mb, totals, key, a), rest, acc_sunk,
                                       has_aux=True)
        g_rest, acc_sunk = vjp((jnp.ones_like(obj), acc_sunk))
        return (obj, parts), join_frozen(jax.tree.map(jnp.add, acc_rest, g_rest), acc_sunk)

    return grad_fn


def split_frozen(params, frozen) -> tuple:
    """(trainable, frozen) trees shaped like `params`, None where the other one holds the leaf: only
    the trainable part is differentiated (a frozen QLoRA base is integer; frozen leaves get no grads)."""
    def pick(want):
        return jax.tree.map(lambda p, f: p if f == want else None, params, frozen)
    return pick(False), pick(True)


def join_frozen(trainable, frozen_params):
    return jax.tree.map(lambda t, f: f if t is None else t, trainable, frozen_params,
                        is_leaf=lambda x: x is None)


def make_loss_fn(cfg: FusionConfig, graphdef):
    """`loss_fn(params, frozen_params, mb, totals, key=None, accs=None) -> (objective, parts)` of one
    micro-batch (`key`: LoRA dropout's); with `accs` (gradient sinks, `sunk_grad_fn`) -> ((objective,
    accs after), parts)."""
    def loss_fn(params, frozen_params, mb, totals, key=None, accs=None):
        model = nnx.merge(graphdef, join_frozen(params, jax.lax.stop_gradient(frozen_params)))
        if key is not None:   # LoRA dropout
            from fusion_jax.lora import attach_dropout_keys
            attach_dropout_keys(model, key)
        if accs is None:
            out = model(mb, return_logits=False)
        else:
            out, accs = _forward_with_sinks(model, mb, accs)
        obj, parts = micro_objective(cfg, out, mb, totals)
        parts["num_targets"] = out["num_targets"]
        return (obj if accs is None else (obj, accs)), parts

    return loss_fn


def train_step_fn(cfg: FusionConfig, graphdef, tx, labels, schedules: dict | None = None,
                  opts: StepOptions = StepOptions(), mesh=None, opt_sharding=None) -> Callable:
    """The pure (un-jitted) `train_step(state, batch) -> (state, metrics)`; `opt_sharding`: the
    optimizer state's shardings (needed with `opts.offload_opt`)."""
    frozen = jax.tree.map(lambda label: label == "frozen", labels)
    A = int(opts.grad_accum)
    dropout = cfg.lora is not None and cfg.lora.dropout > 0   # LoRA dropout: keys from state["rng"]

    loss_fn = make_loss_fn(cfg, graphdef)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True) if A == 1 else sunk_grad_fn(loss_fn, graphdef)

    def train_step(state, batch):
        if mesh is not None:  # lets the model's activation constraints see the mesh
            with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
                return _train_step(state, batch)
        return _train_step(state, batch)

    def _train_step(state, batch):
        batch = model_batch(batch)
        params = state["params"]
        totals = loss_counts(batch)
        trainable, frozen_params = split_frozen(params, frozen)
        rng, step_key = jax.random.split(state["rng"])
        key = step_key if dropout else None
        if A == 1:
            (loss, parts), grads = grad_fn(trainable, frozen_params, batch, totals, _micro_key(key, 0))
        else:
            (loss, parts), grads = _accumulate(grad_fn, trainable, frozen_params, batch, totals, A, mesh, key)
        # frozen leaves: a zero scalar each (their transform is set_to_zero; the norm is unchanged)
        grads = jax.tree.map(lambda g, f: jnp.zeros((), jnp.float32) if g is None else g, grads, frozen_params,
                             is_leaf=lambda x: x is None)
        gnorm = optax.global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(gnorm)
        if opts.offload_opt:   # leaf by leaf, the state copied in and out (train.streamed)
            from fusion_jax.train.streamed import streamed_update
            keep = finite if opts.skip_nonfinite else jnp.bool_(True)
            new_params, opt_state = streamed_update(tx, grads, state["opt_state"], params, frozen, keep,
                                                    opt_sharding)
            new = {"params": new_params, "opt_state": opt_state, "step": state["step"] + 1,
                   "rng": jnp.where(keep, rng, state["rng"])}
        else:
            updates, opt_state = tx.update(grads, state["opt_state"], params)
            new_params = jax.tree.map(lambda p, u, f: p if f else (p + u).astype(p.dtype), params, updates, frozen)
            new = {"params": new_params, "opt_state": opt_state, "step": state["step"] + 1, "rng": rng}
            if opts.skip_nonfinite:
                keep_old = {**state, "step": state["step"] + 1}
                new = jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, keep_old)
        metrics = {"loss": loss, "grad_norm": gnorm, "finite": finite, **parts}
        for k, schedule in (schedules or {}).items():
            metrics[k] = jnp.asarray(schedule(state["step"]), jnp.float32)
        return new, metrics

    return train_step


def make_train_step(cfg: FusionConfig, graphdef, tx, labels, mesh, state_sharding, *,
                    schedules: dict | None = None, opts: StepOptions = StepOptions()):
    """`jax.jit(train_step)` with explicit in/out shardings and donation of the state."""
    cpu_only = [f"config.model.{k}" for k in ("linear_2d", "ce_skip_empty_chunks") if getattr(cfg, k)]
    if cpu_only and mesh.size > 1:  # they change the program per device: XLA:CPU's collectives deadlock
        raise ValueError(f"{' and '.join(cpu_only)}: single-device CPU choices (the tiny preset's); set them "
                         f"False to train on a mesh of {mesh.size} devices")
    fn = train_step_fn(cfg, graphdef, tx, labels, schedules, opts, mesh, state_sharding["opt_state"])
    rep = NamedSharding(mesh, PartitionSpec())
    return jax.jit(fn, in_shardings=(state_sharding, batch_shardings(mesh)),
                   out_shardings=(state_sharding, rep),
                   donate_argnums=(0,) if opts.donate else ())

