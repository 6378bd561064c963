"""The training loop behind train.py: data, setup, init or resume, steps, checkpoints, guard rails."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time

import jax
import numpy as np
from etils import epath
from flax import nnx

from fusion_jax import paths
from fusion_jax.config import FusionConfig
from fusion_jax.nn import REMAT_POLICIES
from fusion_jax.sharding import logical_shardings, make_mesh, shard_batch
from fusion_jax.synth import SynthConfig
from fusion_jax.train import checkpoint as ckpt_lib
from fusion_jax.train import optim, presets, resume
from fusion_jax.train import step as step_lib
from fusion_jax.train.data import build_iterator, prepare_synth
from fusion_jax.train.guards import SkipBudget
from fusion_jax.train.guards import Stopper as _Stopper
from fusion_jax.train.metrics import MetricsLogger, TrainingError, batch_info, fmt_time, log

__all__ = ["Setup", "TrainingError", "resolve_model_config", "train", "validate"]



def maybe_initialize_distributed():
    """jax.distributed.initialize() when launched as one of several processes."""
    env = os.environ
    multi = any(k in env for k in ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS")) or \
        int(env.get("JAX_PROCESS_COUNT", env.get("SLURM_NTASKS", "1")) or 1) > 1 or \
        "TPU_WORKER_HOSTNAMES" in env and "," in env.get("TPU_WORKER_HOSTNAMES", "")
    if multi and not jax.distributed.is_initialized():
        jax.distributed.initialize()


# ----------------------------------------------------------------------------- config

def validate(tc):
    def need(cond, key, msg):
        if not cond:
            raise ValueError(f"config.{key}: {msg}")
    for k in ("total_steps", "log_every", "checkpoint_every", "keep_checkpoints", "init_from", "mesh", "seed"):
        need(k in tc, k, "missing (required key)")
    need(tc.total_steps == -1 or tc.total_steps > 0, "total_steps", f"must be > 0 or -1, got {tc.total_steps}")
    need(tc.log_every > 0, "log_every", f"must be > 0, got {tc.log_every}")
    need(tc.checkpoint_every > 0, "checkpoint_every", f"must be > 0, got {tc.checkpoint_every}")
    keep = tc.keep_checkpoints
    need(isinstance(keep, int) and not isinstance(keep, bool) and keep >= 1, "keep_checkpoints",
         f"must be an integer >= 1 (2 leaves a fallback when the latest cannot be restored), got {keep!r}")
    need(len(tuple(tc.mesh)) == 3, "mesh", f"must be (data, fsdp, tensor), got {tuple(tc.mesh)}")
    nf, sf = tc.optim.max_nonfinite_steps, tc.data.max_skip_fraction
    need(isinstance(nf, int) and not isinstance(nf, bool) and nf >= 0, "optim.max_nonfinite_steps",
         f"must be an integer >= 0 (0: stop at the first NaN/Inf step), got {nf!r}")
    need(isinstance(sf, (int, float)) and not isinstance(sf, bool) and 0 <= sf <= 1, "data.max_skip_fraction",
         f"must be in [0, 1], got {sf!r}")
    need(tc.grad_accum >= 1, "grad_accum", f"must be >= 1, got {tc.grad_accum}")
    need(tc.global_batch_size % tc.grad_accum == 0, "global_batch_size",
         f"{tc.global_batch_size} not divisible by grad_accum={tc.grad_accum}")
    need(tc.optim.lr > 0, "optim.lr", f"must be > 0, got {tc.optim.lr}")
    need(0 <= tc.optim.warmup_ratio < 1, "optim.warmup_ratio", f"must be in [0, 1), got {tc.optim.warmup_ratio}")
    optim.make_schedule(1.0, 100, tc.optim.warmup_ratio, tc.optim.schedule)  # its errors, before synthesis
    need(tc.data.source in ("path", "synth"), "data.source", f"expected path | synth, got {tc.data.source!r}")
    if tc.data.source == "path":
        need(bool(tc.data.path), "data.path", "empty (a JSON/YAML mixture or prepared dataset dir)")
        need(paths.exists(tc.data.path), "data.path", f"{tc.data.path} does not exist")
        need(bool(tc.data.tokenizer) or bool(tc.init_from), "data.tokenizer",
             "empty, and init_from has no tokenizer/ to fall back on")
    if tc.init_from:
        need(paths.exists(tc.init_from), "init_from", f"{tc.init_from} does not exist")
    if "vision_warmup" in tc and tc.vision_warmup.steps > 0:
        need(tc.data.source == "synth", "vision_warmup.steps",
             "needs the synthesized scene descriptions (data.source = 'synth')")
        need(not tc.init_from, "vision_warmup.steps", "is for towers trained from scratch; init_from is set")
        need(jax.process_count() == 1, "vision_warmup.steps",
             f"runs in one process (it gathers the tower's weights); {jax.process_count()} processes")
    for k in ("remat_policy", "vision_remat_policy"):
        need(tc.model[k] in REMAT_POLICIES, f"model.{k}", f"expected {' | '.join(REMAT_POLICIES)}, got {tc.model[k]!r}")
    for k in ("compute_dtype", "param_dtype"):
        need(tc.model[k] in ("float32", "bfloat16"), f"model.{k}", f"expected float32 | bfloat16, got {tc.model[k]!r}")
    g = tc.model.image_token_grid
    need(g is None or isinstance(g, int) and not isinstance(g, bool) and g > 0, "model.image_token_grid",
         f"must be an integer > 0 (None: the tower's own grid), got {g!r}")
    if "embed_init_std" in tc.model:
        std = tc.model.embed_init_std
        ok = isinstance(std, (int, float)) and not isinstance(std, bool) and math.isfinite(std) and std > 0
        need(ok, "model.embed_init_std", f"must be a finite number > 0, got {std!r}")


def model_overrides(tc) -> dict:
    """The one route from train config to model config: every config.model key that names a
    FusionConfig field (preset, vision_tower and tiny pick the base config), and data.max_length."""
    fields = {f.name for f in dataclasses.fields(FusionConfig)}
    out = {**{k: tc.model[k] for k in tc.model.keys() if k in fields}, "max_length": int(tc.data.max_length)}
    if "lora" in tc and tc.lora.rank:  # config.lora: adapters on init_from, the frozen base
        from fusion_jax.config import LoraConfig
        out["lora"] = LoraConfig(**tc.lora.to_dict(), base=_base_pointer(tc.init_from))
    return out


def _base_pointer(init_from: str) -> str:
    """Where a LoRA run's frozen base comes from (a train workdir resolves to its step dir)."""
    if not init_from:
        return ""
    if init_source_kind(init_from) == "train":
        return ckpt_lib.resolve_step_dir(init_from)
    return paths.absolute(init_from)


def init_source_kind(path: str) -> str:
    """'train' (workdir / step dir), 'orbax' (converted folder) or 'hf'."""
    from fusion_jax.convert.orbax_io import is_orbax_dir
    p = epath.Path(path)
    if (p / ckpt_lib.CKPT_DIR).is_dir() or (p / "train").is_dir():
        return "train"
    if is_orbax_dir(path):
        return "orbax"
    if (p / "config.json").is_file():
        return "hf"
    raise ValueError(f"config.init_from: {path} is neither a train workdir/checkpoint, a converted "
                     f"Orbax folder (fusion_config.json + params/) nor an HF folder (config.json)")


def resolve_model_config(tc, vocab_size: int | None) -> FusionConfig:
    """The base config (init_from's, the tiny sizes or a named preset) with model_overrides(tc) applied."""
    if tc.init_from:
        kind = init_source_kind(tc.init_from)
        if kind == "train":
            cfg = ckpt_lib.read_model_config(ckpt_lib.resolve_step_dir(tc.init_from))
        elif kind == "orbax":
            from fusion_jax.convert.orbax_io import read_fusion_config
            cfg = read_fusion_config(tc.init_from)
        else:
            from fusion_jax import hf_io
            cfg = hf_io.read_config(tc.init_from)
    elif tc.model.preset == "tiny":
        cfg = presets.tiny_model_config(tc, vocab_size=int(math.ceil((vocab_size or 256) / 8) * 8))
    else:
        cfg = presets.model_preset(tc.model.preset, tc.model.vision_tower)
    return cfg.replace(**model_overrides(tc))


# ----------------------------------------------------------------------------- setup

class Setup:
    """Everything the loop needs, built from a config (also used by tests and the benchmark)."""

    def __init__(self, tc, workdir: str | None, *, mesh=None, model_cfg: FusionConfig | None = None,
                 vocab_size: int | None = None):
        validate(tc)
        self.tc = tc
        self.mesh = mesh if mesh is not None else make_mesh(tuple(tc.mesh))
        n_batch = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        micro = tc.global_batch_size // tc.grad_accum
        if micro % n_batch:
            raise ValueError(f"config.global_batch_size: micro-batch {micro} (= {tc.global_batch_size} / "
                             f"grad_accum {tc.grad_accum}) not divisible by data x fsdp = {n_batch}")
        if tc.global_batch_size % jax.process_count():
            raise ValueError(f"config.global_batch_size: {tc.global_batch_size} not divisible by "
                             f"{jax.process_count()} processes")
        self.cfg = model_cfg or resolve_model_config(tc, vocab_size)
        self.abstract_model = step_lib.abstract_model(self.cfg)
        self.graphdef, abs_state = nnx.split(self.abstract_model)
        self.abstract_params = abs_state.to_pure_dict()
        self.param_sharding = logical_shardings(abs_state, self.mesh)
        o = tc.optim
        self.total_steps = int(tc.total_steps)
        self.tx, self.labels, self.schedules = optim.make_optimizer(
            self.abstract_params, lr=o.lr, vision_lr=o.vision_lr, total_steps=max(self.total_steps, 1),
            warmup_ratio=o.warmup_ratio, schedule=o.schedule, weight_decay=o.weight_decay,
            b1=o.b1, b2=o.b2, eps=o.eps, grad_clip=o.grad_clip or None, freeze=o.freeze, lora=self.cfg.lora)
        self.abstract_state = step_lib.abstract_train_state(self.abstract_params, self.tx)
        self.host_offload = step_lib.resolve_host_offload(o.get("host_offload", "auto"), self.abstract_state,
                                                          self.mesh)
        self.state_sharding = step_lib.train_state_shardings(self.abstract_state, self.param_sharding,
                                                             self.mesh, offload_opt=self.host_offload)
        self.train_step = step_lib.make_train_step(
            self.cfg, self.graphdef, self.tx, self.labels, self.mesh, self.state_sharding,
            schedules=self.schedules, opts=step_lib.StepOptions(grad_accum=int(tc.grad_accum),
                                                                offload_opt=self.host_offload))

    def sharded_abstract_state(self):
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            self.abstract_state, self.state_sharding)

    def init_params(self):
        """Random init (seeded), or from config.init_from, directly onto the param shardings."""
        tc = self.tc
        if self.cfg.lora is not None:
            return self._init_lora_params()
        if not tc.init_from:
            cfg, seed = self.cfg, int(tc.seed)
            return jax.jit(lambda: nnx.split(step_lib.build_model(cfg, seed))[1].to_pure_dict(),
                           out_shardings=self.param_sharding)()
        if init_source_kind(tc.init_from) == "train":
            abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                    self.abstract_params, self.param_sharding)
            return ckpt_lib.restore_params_tree(ckpt_lib.resolve_step_dir(tc.init_from), abstract)
        import fusion_jax
        flat = {".".join(optim.path_str(p).split("/")): s
                for p, s in jax.tree_util.tree_flatten_with_path(self.param_sharding)[0]}
        model = fusion_jax.from_pretrained(tc.init_from, shardings=lambda n, v: flat[n],
                                           dtype=self.cfg.param_dtype)
        params = nnx.split(model)[1].to_pure_dict()
        return jax.tree.map(lambda x, a: x.astype(a.dtype), params, self.abstract_params)

    def _init_lora_params(self):
        """The base (lora.base, placed on the mesh; or the seeded init) with fresh adapters, base in
        lora.base_dtype."""
        from fusion_jax import lora
        cfg, seed = self.cfg, int(self.tc.seed)
        base = lora.load_base_params(cfg.lora.base, cfg, mesh=self.mesh) if cfg.lora.base else None
        params = jax.jit(lambda b: nnx.split(lora.build_model(cfg, seed, b))[1].to_pure_dict(),
                         out_shardings=self.param_sharding)(base)
        return jax.tree.map(lambda x, a: x.astype(a.dtype), params, self.abstract_params)

    def trainable_part(self, tree):
        """What a checkpoint's params/ holds: everything, or under LoRA the adapters + full_train."""
        if self.cfg.lora is None:
            return tree
        from fusion_jax.lora import trainable_part
        return trainable_part(tree, self.cfg.lora)

    def init_state(self, params=None):
        params = self.init_params() if params is None else params
        seed = int(self.tc.seed)
        return jax.jit(lambda p: step_lib.init_train_state(p, self.tx, seed),
                       out_shardings=self.state_sharding)(params)


# ----------------------------------------------------------------------------- pieces of train()

def dataset_size(tc) -> int:
    from fusion_jax.data.pipeline import open_source
    return len(open_source(tc.data.path, image_folder=tc.data.image_folder or None, seed=int(tc.seed)))


def _tokenizer_dir(tc) -> str:
    if tc.data.tokenizer:
        return tc.data.tokenizer
    if init_source_kind(tc.init_from) == "train":
        return ckpt_lib.tokenizer_dir_of(ckpt_lib.resolve_step_dir(tc.init_from))
    return paths.join(tc.init_from, "tokenizer")


def prepare_data(tc, workdir: str):
    """Synthesize the tiny set when asked; load the tokenizer (copied into the workdir); -1 steps: one epoch."""
    from fusion_jax.data.tokenizer import load_tokenizer
    if tc.data.source == "synth":
        if "synth" not in tc.data:
            raise ValueError("config.data.synth: missing (data.source = 'synth' needs the tiny preset's settings)")
        tc.data.path, tc.data.image_folder, tc.data.tokenizer = prepare_synth(
            workdir, SynthConfig(**tc.data.synth), template=tc.data.template,
            tokenizer_vocab_size=tc.data.tokenizer_vocab_size, log=log)
    tok_dir = _tokenizer_dir(tc)
    tokenizer = load_tokenizer(tok_dir)
    wd_tok = paths.join(workdir, ckpt_lib.TOKENIZER)
    if jax.process_index() == 0 and paths.absolute(tok_dir) != wd_tok:
        paths.copy_tree(tok_dir, wd_tok)
    if tc.total_steps == -1:
        n = dataset_size(tc)
        tc.total_steps = max(1, n // tc.global_batch_size)
        log(f"total_steps = one epoch = {n} samples // {tc.global_batch_size} = {tc.total_steps}")
    return tokenizer


def write_run_configs(tc, cfg: FusionConfig, workdir: str):
    """WORKDIR/config.json (the train config) and fusion_config.json (the model that ran), once a resumed
    run's config has passed the drift check against the saved one (left untouched when it fails)."""
    changed = resume.check_config_drift(tc, workdir, resolved=True)
    if jax.process_index() != 0:
        return
    resume.save_run_config(tc, workdir, keep_old=bool(changed))
    paths.write_text_atomic(paths.join(workdir, ckpt_lib.CONFIG), cfg.to_json())


def warm_start(s: Setup, params: dict) -> dict:
    """The tiny demo's tower warm-up (config.vision_warmup) on freshly initialized params."""
    from fusion_jax.train.tower_warmup import warm_start_tower
    tc, vw = s.tc, s.tc.vision_warmup
    tower = params["model"]["vision_tower"]
    new, _ = warm_start_tower(s.cfg, tc.data.image_folder, jax.device_get(tower), steps=vw.steps, lr=vw.lr,
                              batch_size=vw.batch_size, seed=int(tc.seed), text_images=vw.text_images,
                              image_size=tc.data.synth.image_size, difficulty=tc.data.synth.difficulty, log=log)
    params["model"]["vision_tower"] = jax.tree.map(
        lambda a, b: jax.device_put(np.asarray(b, a.dtype), a.sharding), tower, new)
    return params


def init_or_resume(s: Setup, ck, it, workdir: str):
    """(state, start step): the newest checkpoint of the workdir that restores, else a fresh (warmed-up)
    init when it has none."""
    abstract = s.sharded_abstract_state()
    try:
        restored = resume.restore_latest_good(ck, {**abstract, "params": s.trainable_part(abstract["params"])}, it)
    except TrainingError:
        ck.close()   # train() closes it only once the loop starts; a stray manager's threads outlive the run
        raise
    if restored is not None:
        state, latest = restored
        if s.cfg.lora is not None:  # the checkpoint holds what changed; the base comes from lora.base
            from fusion_jax.lora import merge_parts
            state["params"] = merge_parts(s.init_params(), state["params"])
        log(f"resumed from {ck.directory}/{latest}")
        return state, int(latest)
    params = None
    if "vision_warmup" in s.tc and s.tc.vision_warmup.steps > 0:
        params = warm_start(s, s.init_params())
    state = s.init_state(params)
    log(f"initialized from {s.tc.init_from or f'scratch (seed {s.tc.seed})'}")
    return state, 0


def log_setup(s: Setup, seconds: float):
    leaves, labels = jax.tree.leaves(s.abstract_params), jax.tree.leaves(s.labels)
    n_params = sum(int(np.prod(x.shape)) for x in leaves)
    n_frozen = sum(int(np.prod(x.shape)) for x, lab in zip(leaves, labels, strict=True) if lab == "frozen")
    tc = s.tc
    log(f"model: {n_params:,} params ({n_frozen:,} frozen); mesh {dict(s.mesh.shape)}; "
        f"global batch {tc.global_batch_size} (grad_accum {tc.grad_accum}); {s.total_steps} steps; "
        f"devices {jax.device_count()} x {jax.devices()[0].device_kind}; setup {seconds:.1f}s")


# ----------------------------------------------------------------------------- train

def _run_steps(s: Setup, state, start: int, it, ck, metrics) -> tuple:
    """The step loop: (state, last step, why it stopped early or None). Every host takes the same
    decisions at the same step: stop signals, non-finite steps (global metrics), the skip budget."""
    tc = s.tc
    meta = {"model_config": s.cfg.to_dict(), "train_config": json.loads(tc.to_json_best_effort())}
    skips = SkipBudget(tc, tc.global_batch_size // jax.process_count())
    step, stopped = start, None
    with _Stopper() as stop:
        while step < s.total_steps and stopped is None:
            raw = next(it)
            data = skips.check(it, step + 1)  # a TrainingError past data.max_skip_fraction
            batch = shard_batch({k: raw[k] for k in step_lib.BATCH_KEYS}, s.mesh)
            state, m = s.train_step(state, batch)
            step += 1
            metrics.push(step, m, {**batch_info(s.cfg, raw, batch), "data": data})
            stopped = stop.reason(tc, step, start)
            if step % tc.checkpoint_every == 0 or stopped or step == s.total_steps:
                metrics.flush()  # a non-finite step past the budget raises here, before its checkpoint
                metrics.sync()
                ck.save(step, state, it.get_state(), meta, force=True)
        metrics.flush()
    return state, step, stopped


def train(tc, workdir: str) -> dict:
    """Run (or resume) training; returns a summary dict. Raises TrainingError on NaN/Inf (past
    optim.max_nonfinite_steps in a row) and when more than data.max_skip_fraction of the records
    were skipped."""
    maybe_initialize_distributed()
    validate(tc)
    workdir = paths.absolute(workdir)
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)
    resume.check_config_drift(tc, workdir, resolved=False)  # before prepare_data writes into the workdir
    t_setup = time.time()
    tokenizer = prepare_data(tc, workdir)
    s = Setup(tc, workdir, vocab_size=tokenizer.vocab_size)
    if s.cfg.llm.vocab_size < tokenizer.vocab_size:
        raise ValueError(f"config.data.tokenizer: {tokenizer.vocab_size} tokens but the model's vocab is "
                         f"{s.cfg.llm.vocab_size}")
    write_run_configs(tc, s.cfg, workdir)
    ck = ckpt_lib.Checkpointer(workdir, keep=tc.keep_checkpoints, every=tc.checkpoint_every,
                               async_save=tc.async_checkpoint, model_config_json=s.cfg.to_json(),
                               tokenizer_dir=paths.join(workdir, ckpt_lib.TOKENIZER), params_part=s.trainable_part)
    it = build_iterator(tc.data, s.cfg, tokenizer, per_process_batch=tc.global_batch_size // jax.process_count(),
                        seed=int(tc.seed))
    state, start = init_or_resume(s, ck, it, workdir)
    log_setup(s, time.time() - t_setup)
    metrics = MetricsLogger(workdir, total_steps=s.total_steps, start=start, log_every=tc.log_every,
                            tensorboard=tc.tensorboard, last_good=lambda: f"{ck.directory}/{ck.latest_step()}",
                            max_nonfinite=tc.optim.max_nonfinite_steps)
    try:
        state, step, stopped = _run_steps(s, state, start, it, ck, metrics)
    finally:
        ck.close()
        it.close()
        metrics.close()
    summary = {"start_step": start, "step": step, "stopped": stopped, "wall_s": time.time() - metrics.t_run0,
               "nonfinite_skipped": metrics.nonfinite_total,
               "last": {k: float(v) for k, v in (metrics.last or {}).items()}}
    if stopped:
        log(f"stopped at step {step} ({stopped}); checkpoint saved. Rerun the same command to resume.")
        return summary
    log(f"done: {step} steps in {fmt_time(summary['wall_s'])}; final checkpoint {ck.directory}/{step}")
    if "heldout_eval" in tc and jax.process_count() == 1:
        from fusion_jax.train.heldout import evaluate_heldout
        summary["heldout"] = evaluate_heldout(
            s.graphdef, jax.device_get(state["params"]), tokenizer, tc.data.image_folder, workdir,
            batch_size=tc.heldout_eval.batch_size, max_new_tokens=tc.heldout_eval.max_new_tokens, log=log)
    return summary
