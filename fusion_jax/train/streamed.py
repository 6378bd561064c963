"""The optimizer update with its state in host memory, streamed one parameter at a time.

With `optim.host_offload` the optimizer state lives in host memory (`pinned_host`) between steps.
Copying it all into HBM for the update needs the whole state there at once (18.6 GiB per chip for 8B
on v6e:2x2). Here each trainable parameter's state (Adam's mu and nu) is copied in, updated with
the parameter, and copied back out before the next parameter's is copied in: an optimization
barrier ties each copy-in to the previous copy-out. The state's layout (and so the checkpoints)
does not change.

The optax transform runs once per parameter on trees of the full structure in which every other
parameter's leaves are empty arrays: its per-leaf arithmetic is the same as the whole-tree update,
bit for bit. Global-norm clipping is the one transform that looks across leaves, so
`optim.make_optimizer` keeps it apart (`Clipped`) and it runs once on the whole gradient first.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def _owners(state_flat, params_flat) -> list:
    """For each state leaf, the index of the parameter it mirrors (same path suffix and shape), or None."""
    from fusion_jax.train.step import _names, mirrored
    index = {_names(p): i for i, (p, _) in enumerate(params_flat)}
    return [mirrored(path, index, lambda k, leaf=leaf: jnp.shape(leaf) == jnp.shape(params_flat[k][1]))
            for path, leaf in state_flat]


def _empty(x, like):
    """A zero-size stand-in for `x`, shaped like the stand-in of the parameter `like`."""
    return jnp.zeros((0,) * max(jnp.ndim(like), 1), x.dtype)


def _to(x, sharding, kind):
    return jax.device_put(x, sharding.with_memory_kind(kind))


def streamed_update(tx, grads, opt_state, params, frozen, finite, opt_sharding):
    """(new params, new opt_state): `tx.update` applied parameter by parameter, with `opt_state` in
    host memory (`opt_sharding`: its shardings); where `finite` is False both stay as they were."""
    from fusion_jax.train.optim import Clipped
    if isinstance(tx, Clipped):   # the one cross-leaf transform: once, on the whole gradient
        grads, _ = tx.clip.update(grads, tx.clip.init(params))
        inner_new, params = _per_parameter(tx.inner, grads, opt_state[1], params, frozen, finite, opt_sharding[1])
        return params, (opt_state[0], inner_new, *opt_state[2:])
    new_state, params = _per_parameter(tx, grads, opt_state, params, frozen, finite, opt_sharding)
    return params, new_state


def _per_parameter(tx, grads, state, params, frozen, finite, state_sharding):
    p_flat, p_def = jax.tree_util.tree_flatten_with_path(params)
    p_leaves = [x for _, x in p_flat]
    g_leaves = p_def.flatten_up_to(grads)
    f_leaves = p_def.flatten_up_to(frozen)
    s_flat, s_def = jax.tree_util.tree_flatten_with_path(state)
    s_leaves = [x for _, x in s_flat]
    shard = s_def.flatten_up_to(state_sharding)
    owner = _owners(s_flat, p_flat)
    stray = [jax.tree_util.keystr(p) for (p, x), o in zip(s_flat, owner, strict=True) if o is None and jnp.ndim(x)]
    if stray:   # it would reach every per-parameter call whole; only scalars (counts) may
        raise ValueError(f"optim.host_offload: optimizer state {stray[:3]} mirrors no parameter (by path and "
                         f"shape), so the update cannot be streamed; set optim.host_offload=off")

    # the state leaves no parameter owns (step counts): on device for every call, updated once
    shared = {j: _to(x, shard[j], "device") for j, x in enumerate(s_leaves) if owner[j] is None}
    new_s, new_p = list(s_leaves), list(p_leaves)
    token, first = shared, True
    for k in range(len(p_leaves)):
        if f_leaves[k]:
            continue
        mine = [j for j in range(len(s_leaves)) if owner[j] == k]
        token, host_in = jax.lax.optimization_barrier((token, [s_leaves[j] for j in mine]))
        dev = {j: _to(x, shard[j], "device") for j, x in zip(mine, host_in, strict=True)}

        def pick(i, leaves, k=k):
            return leaves[i] if i == k else _empty(leaves[i], p_leaves[i])

        g = p_def.unflatten([pick(i, g_leaves) for i in range(len(p_leaves))])
        p = p_def.unflatten([pick(i, p_leaves) for i in range(len(p_leaves))])
        s = s_def.unflatten([dev[j] if j in dev else shared[j] if owner[j] is None
                             else _empty(s_leaves[j], p_leaves[owner[j]]) for j in range(len(s_leaves))])
        updates, out = tx.update(g, s, p)
        u, out = p_def.flatten_up_to(updates)[k], s_def.flatten_up_to(out)
        new_p[k] = jnp.where(finite, (p_leaves[k] + u).astype(p_leaves[k].dtype), p_leaves[k])
        for j in mine:
            new_s[j] = _to(jnp.where(finite, out[j], dev[j]), shard[j], "pinned_host")
        if first:   # every call computes the same new counts
            for j in shared:
                new_s[j] = _to(jnp.where(finite, out[j], shared[j]), shard[j], "pinned_host")
            first = False
        token = [new_s[j] for j in mine]
    return s_def.unflatten(new_s), p_def.unflatten(new_p)
