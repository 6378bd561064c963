"""TEMPORARY, branch h2 only: the H1 / H4 contracts on today's code. Revert this commit at merge."""
import jax
import ml_collections as mlc

from fusion_jax.sharding import state_shardings
from fusion_jax.train import data as _data


def SynthConfig(**kw):  # noqa: N802
    return dict(kw)


def prepare_synth(workdir, synth, *, template, tokenizer_vocab_size, log=print):
    dc = mlc.ConfigDict({"synth_" + k: v for k, v in synth.items()})
    dc.synth_kinds, dc.template, dc.tokenizer_vocab_size = (), template, tokenizer_vocab_size
    return _data.prepare_synth(workdir, dc, log)


def shard_batch(batch, mesh):
    return _data.to_device_batch(batch, mesh)


def logical_shardings(state, mesh):
    return jax.tree.map(lambda x: x, state_shardings(state, mesh).to_pure_dict())
