"""Small building blocks with PyTorch-named parameters and logical sharding axes.

Every parameter is an `nnx.Param` carrying `logical_axes`; `fusion_jax.sharding`
maps those names to mesh axes with one rules table. A leading `stack` shape makes
the same module hold the parameters of several layers at once (scanned).
"""
from __future__ import annotations

import contextlib
import contextvars
import math
import operator

import jax
import jax.numpy as jnp
from flax import nnx

LAYERS = "layers"


def dtype_of(name) -> jnp.dtype:
    return jnp.dtype(name)


def _param(value, axes):
    return nnx.Param(value, logical_axes=tuple(axes))


class LoraParam(nnx.Param):
    """A low-rank adapter factor (`lora_a` [.., in, r] / `lora_b` [.., r, out]): trained under LoRA."""


class LoraDropoutKey(nnx.Variable):
    """PRNG keys of LoRA dropout ([..layers, key]), attached for one training forward only
    (`lora.attach_dropout_keys`): never a parameter, never saved; without it the adapters run undropped."""


class QuantParam(nnx.Param):
    """A frozen QLoRA base weight's qwix QArray parts (`kernel_qvalue`, `kernel_scale`)."""


class Linear(nnx.Module):
    """y = x @ kernel + bias; kernel is [in, out] (PyTorch weight transposed).

    `linear_2d` (FusionConfig.linear_2d, a CPU choice): run [..., in] inputs as one 2-D matmul;
    XLA:CPU runs the weight gradient of [B, N, D] inputs ~2x slower. Not for sharded batches:
    merging a sharded batch axis deadlocked XLA:CPU's SPMD collectives.
    """

    def __init__(self, din: int, dout: int, *, use_bias: bool = True, axes=("embed", "mlp"),
                 stack: tuple[int, ...] = (), rngs: nnx.Rngs, std: float | None = None,
                 param_dtype="float32", dtype="float32", linear_2d: bool = False):
        std = 1.0 / math.sqrt(din) if std is None else std
        sa = (LAYERS,) * len(stack)
        k = jax.random.normal(rngs.params(), stack + (din, dout), jnp.float32) * std
        self.kernel = _param(k.astype(param_dtype), sa + tuple(axes))
        self.bias = _param(jnp.zeros(stack + (dout,), param_dtype), sa + (axes[1],)) if use_bias else None
        self.dtype, self.linear_2d = dtype, linear_2d

    def add_lora(self, rank: int, scale: float, key, init_a=None, dropout: float = 0.0):
        """Adapters y += scale * (dropout(x) @ lora_a) @ lora_b, stacked like the kernel; lora_b = 0, so
        the output is unchanged until it trains. `init_a(key, shape, dtype)`: qwix LoraRule's he_uniform.
        `dropout` (peft's lora_dropout) acts only while a `LoraDropoutKey` is attached (training)."""
        shape, axes = self.kernel.get_value().shape, self.kernel.get_metadata()["logical_axes"]
        sa, (din, dout) = axes[:-2], shape[-2:]
        dt = jnp.float32 if self.kernel.get_value().dtype.itemsize < 4 else self.kernel.get_value().dtype
        a = init_a(key, shape[:-2] + (din, rank), dt)
        self.lora_a = LoraParam(a, logical_axes=sa + (axes[-2], "lora_rank"))
        self.lora_b = LoraParam(jnp.zeros(shape[:-2] + (rank, dout), dt), logical_axes=sa + ("lora_rank", axes[-1]))
        self.lora_scale = float(scale)
        self.lora_dropout = float(dropout)

    def quantize_kernel(self, qtype: str, tile: int):
        """Replace the (frozen) kernel by a qwix QArray: per output channel, tiles of `tile` inputs."""
        import qwix
        k = self.kernel.get_value()
        axes = self.kernel.get_metadata()["logical_axes"]
        din = k.shape[-2]
        q = qwix.quantize(k.astype(jnp.float32), jnp.dtype(qtype) if qtype != "nf4" else qtype,
                          channelwise_axes=tuple(range(k.ndim - 2)) + (k.ndim - 1,),
                          tiled_axes={k.ndim - 2: min(tile, din) if din % min(tile, din) == 0 else din})
        self.kernel = None
        self.kernel_qvalue = QuantParam(q.qvalue, logical_axes=axes)
        self.kernel_scale = QuantParam(q.scale.astype(jnp.bfloat16), logical_axes=axes)
        self.kernel_qtype = qtype

    def _base(self, x, dt):
        if self.kernel is not None:
            w = self.kernel[...].astype(dt)
            if self.linear_2d and w.ndim == 2 and x.ndim > 2:
                return jnp.matmul(x.astype(dt).reshape(-1, x.shape[-1]), w).reshape(x.shape[:-1] + w.shape[-1:])
            return jnp.matmul(x.astype(dt), w)
        import qwix
        qtype = self.kernel_qtype if self.kernel_qtype == "nf4" else jnp.dtype(self.kernel_qtype)
        w = qwix.QArray(self.kernel_qvalue[...], self.kernel_scale[...].astype(dt), qtype=qtype)
        return qwix.dot_general(x.astype(dt), w, (((x.ndim - 1,), (0,)), ((), ())))

    def _lora(self, x, dt):
        """scale * (dropout(x) @ A) @ B; the base path sees x undropped (peft's order)."""
        key = getattr(self, "lora_dropout_key", None)
        if key is not None and self.lora_dropout > 0:
            keep = jax.random.bernoulli(key[...], 1.0 - self.lora_dropout, x.shape)
            x = jnp.where(keep, x / jnp.asarray(1.0 - self.lora_dropout, dt), jnp.zeros((), dt))
        a, b = self.lora_a[...].astype(dt), self.lora_b[...].astype(dt)
        return jnp.matmul(jnp.matmul(x, a), b) * jnp.asarray(self.lora_scale, dt)

    def __call__(self, x):
        dt = dtype_of(self.dtype)
        y = self._base(x, dt)
        if getattr(self, "lora_a", None) is not None:
            y = y + self._lora(x.astype(dt), dt)
        if self.bias is not None:
            y = y + self.bias[...].astype(dt)
        return y


class LayerNorm(nnx.Module):
    """PyTorch LayerNorm (biased variance), statistics in float32."""

    def __init__(self, dim: int, *, eps: float = 1e-5, axis_name="norm", stack=(),
                 param_dtype="float32", dtype="float32"):
        sa = (LAYERS,) * len(stack)
        self.weight = _param(jnp.ones(stack + (dim,), param_dtype), sa + (axis_name,))
        self.bias = _param(jnp.zeros(stack + (dim,), param_dtype), sa + (axis_name,))
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x):
        xf = x.astype(jnp.float32)
        mean = jnp.mean(xf, -1, keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), -1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
        y = y * self.weight[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(dtype_of(self.dtype))


class RMSNorm(nnx.Module):
    """HF Llama/Phi3/Qwen2 RMSNorm: normalise in float32, cast, then scale."""

    def __init__(self, dim: int, *, eps: float = 1e-6, stack=(), param_dtype="float32",
                 dtype="float32"):
        sa = (LAYERS,) * len(stack)
        self.weight = _param(jnp.ones(stack + (dim,), param_dtype), sa + ("norm",))
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x):
        dt = dtype_of(self.dtype)
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), -1, keepdims=True) + self.eps)
        return self.weight[...].astype(dt) * y.astype(dt)


class Embed(nnx.Module):
    def __init__(self, num: int, dim: int, *, rngs: nnx.Rngs, axes=("vocab", "embed"),
                 std: float = 0.02, param_dtype="float32", dtype="float32"):
        e = jax.random.normal(rngs.params(), (num, dim), jnp.float32) * std
        self.weight = _param(e.astype(param_dtype), axes)
        self.dtype = dtype

    def __call__(self, ids):
        return jnp.take(self.weight[...], ids, axis=0).astype(dtype_of(self.dtype))

    def attend(self, x):
        """Tied output head: x @ weight.T."""
        dt = dtype_of(self.dtype)
        return jnp.matmul(x.astype(dt), self.weight[...].astype(dt).T)


def gelu_exact(x):
    return jax.nn.gelu(x, approximate=False)


def gelu_tanh(x):
    return jax.nn.gelu(x, approximate=True)


ACT = {"gelu": gelu_exact, "gelu_pytorch_tanh": gelu_tanh, "gelu_new": gelu_tanh,
       "silu": jax.nn.silu, "relu": jax.nn.relu}


class Projector(nnx.Module):
    """`mlp{N}x_gelu` (or `linear`): Linear, [GELU, Linear] * (N-1).

    Layers are named linear_0, linear_2, ... after their nn.Sequential index.
    """

    def __init__(self, din: int, dout: int, depth: int, *, rngs: nnx.Rngs, axes_in=("embed", "mlp"),
                 axes_out=("mlp", "embed"), **kw):
        self.depth = depth
        for i in range(depth):
            a = axes_in if i == 0 else axes_out
            setattr(self, f"linear_{2 * i}", Linear(din if i == 0 else dout, dout, axes=a, rngs=rngs, **kw))

    def __call__(self, x):
        for i in range(self.depth):
            if i:
                x = gelu_exact(x)
            x = getattr(self, f"linear_{2 * i}")(x)
        return x


def scanned(module: nnx.Module) -> nnx.Module:
    """Mark a stacked module that `scan_layers` runs, so gradient accumulation can sink its grads."""
    module.scan_layers_stack = True
    return module


def scanned_modules(model: nnx.Module) -> dict[tuple, nnx.Module]:
    """{path (pure-dict keys): module} of the modules marked with `scanned`."""
    return {tuple(path): m for path, m in nnx.iter_modules(model) if getattr(m, "scan_layers_stack", False)}


def scan_layers(layers: nnx.Module, body, carry, xs=None, *, unroll: bool = False,
                remat_policy: str = "none"):
    """Apply `body(layer, carry, x) -> (carry, y)` over a stacked module.

    `layers` holds parameters with a leading layer axis. With `unroll` the layers
    run in a Python loop (for debugging / tiny models); otherwise in `lax.scan`.
    Under `grad_sinks` the module's accumulators ride in the carry (see there).
    """
    graphdef, state = nnx.split(layers)

    def step(c, inp):
        st, x = inp
        return body(nnx.merge(graphdef, st), c, x)

    step = remat(step, remat_policy)
    n = jax.tree.leaves(state)[0].shape[0]
    acc = _take_sink(layers)
    if acc is not None:
        step, carry, xs, state = _sunk(step), (carry, acc), (xs, jnp.arange(n)), nnx.to_pure_dict(state)
    if unroll:
        ys = []
        for i in range(n):
            carry, y = step(carry, jax.tree.map(operator.itemgetter(i), (state, xs)))
            ys.append(y)
        ys = None if ys[0] is None else jax.tree.map(lambda *a: jnp.stack(a), *ys)
    else:
        carry, ys = jax.lax.scan(step, carry, (state, xs))
    if acc is not None:
        carry, acc = carry
        _put_sink(layers, acc)
    return carry, ys


# ----------------------------------------------------------------------------- gradient sinks
# Gradient accumulation without a second fp32 copy of the stacked weights' gradients: the
# accumulator of a scanned stack is carried through its scan, and the backward adds each
# layer's weight gradient into its row in place (`_sink`'s VJP), instead of building a fresh
# [layers, ...] gradient that is then added to the accumulator.

_SINKS: contextvars.ContextVar = contextvars.ContextVar("fusion_grad_sinks", default=None)


@contextlib.contextmanager
def grad_sinks(accs: dict):
    """`accs`: {id(scanned module): accumulator pure dict (None where a leaf takes no gradient)}.

    Yields the same dict, updated as the scans run (a module scanned twice chains its accumulator);
    raises if a module never ran. Differentiate with respect to the accumulators given in, with the
    final ones' cotangent = the running sums: the result is running sum + this pass's gradient."""
    box = {"acc": dict(accs), "used": set()}
    token = _SINKS.set(box)
    try:
        yield box["acc"]
    finally:
        _SINKS.reset(token)
    if box["used"] != set(accs):
        raise ValueError(f"grad_sinks: {len(set(accs) - box['used'])} scanned module(s) did not run through "
                         "scan_layers; their gradients would be lost")


def _take_sink(layers):
    box = _SINKS.get()
    if box is None or id(layers) not in box["acc"]:
        return None
    box["used"].add(id(layers))
    return box["acc"][id(layers)]


def _put_sink(layers, acc):
    _SINKS.get()["acc"][id(layers)] = acc


@jax.custom_vjp
def _sink(w, acc, i):
    return w, acc


def _sink_fwd(w, acc, i):
    return (w, acc), i


def _sink_bwd(i, cts):
    ct_w, ct_acc = cts
    row = jax.lax.dynamic_index_in_dim(ct_acc, i, 0, keepdims=False) + ct_w.astype(ct_acc.dtype)
    return None, jax.lax.dynamic_update_index_in_dim(ct_acc, row, i, 0), None


_sink.defvjp(_sink_fwd, _sink_bwd)


def _sink_tree(st, acc, i):
    """Route layer i's weights `st` through `_sink` where `acc` (same paths) holds an accumulator."""
    flat = jax.tree_util.tree_flatten_with_path(acc)[0]
    accs, new = dict(flat), {}

    def one(path, w):
        if path not in accs:
            return w
        w, new[path] = _sink(w, accs[path], i)
        return w

    st = jax.tree_util.tree_map_with_path(one, st)
    if len(new) != len(flat):
        missing = sorted(set(accs) - set(new), key=str)
        raise KeyError(f"grad_sinks: accumulators {[jax.tree_util.keystr(p) for p in missing]} match no weight")
    return st, jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(acc), [new[p] for p, _ in flat])


def _sunk(step):
    def run(carry, inp):
        (c, acc), (st, (x, i)) = carry, inp
        st, acc = _sink_tree(st, acc, i)
        c, y = step(c, (st, x))
        return (c, acc), y
    return run


REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch", "dots_with_no_batch_dims_saveable", "offload_dot",
                  "nothing")
ATTENTION_NAME = "attention"   # checkpoint name of the fused attention kernels' output and residuals
LAYER_INPUT_NAME = "decoder_layer_input"   # checkpoint name of a decoder layer's input (offload_dot)


def _offload_dot():
    """Offload the decoder layer input (by name) and the matmuls without batch dims to pinned_host
    (jax's save_from_both_policies takes only boolean policies)."""
    cp = jax.checkpoint_policies
    names = cp.save_and_offload_only_these_names(names_which_can_be_saved=[],
                                                 names_which_can_be_offloaded=[LAYER_INPUT_NAME],
                                                 offload_src="device", offload_dst="pinned_host")
    dots = cp.offload_dot_with_no_batch_dims("device", "pinned_host")

    def policy(prim, *args, **params):
        return (names if "name" in params else dots)(prim, *args, **params)
    return policy


def remat_policy(policy: str):
    """The jax.checkpoint policy of a `remat_policy` setting (None: save nothing).

    dots_with_no_batch_dims_saveable: save the weight matmuls' outputs (jax's policy of that name);
    dots_no_batch: the same plus the fused attention's output and residuals, so the backward does
    not rerun the attention kernel; offload_dot: the decoder layers' inputs (what `full` keeps in
    HBM) and those matmul outputs go to host memory (`pinned_host`) and come back for the backward.
    """
    cp = jax.checkpoint_policies
    pol = {
        "full": None,
        "dots": cp.checkpoint_dots,
        "dots_no_batch": cp.save_from_both_policies(cp.dots_with_no_batch_dims_saveable,
                                                    cp.save_only_these_names(ATTENTION_NAME)),
        "dots_with_no_batch_dims_saveable": cp.dots_with_no_batch_dims_saveable,
        "offload_dot": _offload_dot(),
        "nothing": cp.nothing_saveable,
    }
    if policy not in pol:
        raise ValueError(f"remat_policy={policy!r}: expected one of {', '.join(REMAT_POLICIES)}")
    return pol[policy]


def remat(fn, policy: str):
    if policy in (None, "none"):
        return fn
    return jax.checkpoint(fn, policy=remat_policy(policy), prevent_cse=False)
