"""The training loop behind train.py: setup, resume, steps, logging, checkpoints, guard rails."""
from __future__ import annotations

import json
import math
import os
import signal
import time

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from fusion_jax.config import FusionConfig, parse_query_len
from fusion_jax.sharding import make_mesh, spec_for
from fusion_jax.train import checkpoint as ckpt_lib
from fusion_jax.train import flops as flops_lib
from fusion_jax.train import optim, presets
from fusion_jax.train import step as step_lib


class TrainingError(RuntimeError):
    """A stop the user must act on (NaN loss, bad config); the message says what happened."""


def log(msg: str):
    if jax.process_index() == 0:
        print(msg, flush=True)


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
    for k in ("total_steps", "log_every", "checkpoint_every", "init_from", "mesh", "seed"):
        need(k in tc, k, "missing (required key)")
    need(tc.total_steps == -1 or tc.total_steps > 0, "total_steps", f"must be > 0 or -1, got {tc.total_steps}")
    need(tc.log_every > 0, "log_every", f"must be > 0, got {tc.log_every}")
    need(tc.checkpoint_every > 0, "checkpoint_every", f"must be > 0, got {tc.checkpoint_every}")
    need(len(tuple(tc.mesh)) == 3, "mesh", f"must be (data, fsdp, tensor), got {tuple(tc.mesh)}")
    need(tc.grad_accum >= 1, "grad_accum", f"must be >= 1, got {tc.grad_accum}")
    need(tc.global_batch_size % tc.grad_accum == 0, "global_batch_size",
         f"{tc.global_batch_size} not divisible by grad_accum={tc.grad_accum}")
    need(tc.optim.lr > 0, "optim.lr", f"must be > 0, got {tc.optim.lr}")
    need(0 <= tc.optim.warmup_ratio < 1, "optim.warmup_ratio", f"must be in [0, 1), got {tc.optim.warmup_ratio}")
    end, decay = tc.optim.get("end_lr_ratio", 0.0), tc.optim.get("decay_ratio", 1.0)  # older configs lack them
    need(0 <= end <= 1, "optim.end_lr_ratio", f"must be in [0, 1], got {end}")
    need(0 < decay <= 1, "optim.decay_ratio", f"must be in (0, 1], got {decay}")
    optim.make_schedule(1.0, 100, tc.optim.warmup_ratio, tc.optim.schedule, end, decay)  # its errors, before synthesis
    need(tc.data.source in ("path", "synth"), "data.source", f"expected path | synth, got {tc.data.source!r}")
    if tc.data.source == "path":
        need(bool(tc.data.path), "data.path", "empty (a JSON/YAML mixture or prepared dataset dir)")
        need(os.path.exists(tc.data.path), "data.path", f"{tc.data.path} does not exist")
        need(bool(tc.data.tokenizer) or bool(tc.init_from), "data.tokenizer",
             "empty, and init_from has no tokenizer/ to fall back on")
    if tc.init_from:
        need(os.path.exists(tc.init_from), "init_from", f"{tc.init_from} does not exist")
    if int(tc.get("vision_warmup", {}).get("steps", 0)) > 0:
        need(tc.data.source == "synth", "vision_warmup.steps",
             "needs the synthesized scene descriptions (data.source = 'synth')")
        need(not tc.init_from, "vision_warmup.steps", "is for towers trained from scratch; init_from is set")
        need(jax.process_count() == 1, "vision_warmup.steps",
             f"runs in one process (it gathers the tower's weights); {jax.process_count()} processes")
        bands = int(tc.vision_warmup.get("region_bands", 0))
        need(0 <= bands <= 8, "vision_warmup.region_bands", f"must be 0 (off) to 8, got {bands}")
        rw = float(tc.vision_warmup.get("region_weight", 1.0))
        need(rw > 0, "vision_warmup.region_weight", f"must be > 0, got {rw}")
        st = tc.vision_warmup.get("side_tags", False)
        need(isinstance(st, bool), "vision_warmup.side_tags", f"must be True or False, got {st!r}")
        dt = tc.vision_warmup.get("dense_tags", False)
        need(isinstance(dt, bool), "vision_warmup.dense_tags", f"must be True or False, got {dt!r}")
    if int(tc.get("llm_warmup", {}).get("steps", 0)) > 0:
        need(tc.data.source == "synth", "llm_warmup.steps",
             "needs the synthesized captions: set data.source = 'synth' (or llm_warmup.steps = 0)")
        need(not tc.init_from, "llm_warmup.steps", "is for decoders trained from scratch; init_from is set")
        need(jax.process_count() == 1, "llm_warmup.steps", "runs on one process (a CPU demo stage)")
        n = int(tc.llm_warmup.seq_len)
        need(n >= 8, "llm_warmup.seq_len", f"must be >= 8, got {n}")
    for k in ("remat_policy", "vision_remat_policy"):
        need(tc.model[k] in ("none", "full", "dots", "dots_no_batch", "nothing"), f"model.{k}",
             f"expected none | full | dots | dots_no_batch | nothing, got {tc.model[k]!r}")
    for k in ("compute_dtype", "param_dtype"):
        need(tc.model[k] in ("float32", "bfloat16"), f"model.{k}", f"expected float32 | bfloat16, got {tc.model[k]!r}")
    g = tc.model.get("image_token_grid", 0)
    need(isinstance(g, int) and not isinstance(g, bool) and g >= 0, "model.image_token_grid",
         f"must be an integer >= 0 (0: the tower's own grid), got {g!r}")
    pw = tc.model.get("ce_turn_power", 0.0)
    need(isinstance(pw, (int, float)) and not isinstance(pw, bool) and math.isfinite(pw) and pw >= 0,
         "model.ce_turn_power", f"must be a finite number >= 0 (0: token mean), got {pw!r}")
    if "tiny" in tc.model:
        std = tc.model.tiny.get("embed_init_std", 0.02)
        ok = isinstance(std, (int, float)) and not isinstance(std, bool) and math.isfinite(std) and std > 0
        need(ok, "model.tiny.embed_init_std", f"must be a finite number > 0, got {std!r}")


def model_overrides(tc) -> dict:
    m = tc.model
    return dict(compute_dtype=m.compute_dtype, param_dtype=m.param_dtype, scan_layers=bool(m.scan_layers),
                remat_policy=m.remat_policy, use_tune=bool(m.use_tune), use_card=bool(m.use_card),
                use_dsm=bool(m.use_dsm), query_len=parse_query_len(m.query_len),
                early_mask_mode=m.early_mask_mode, max_length=int(tc.data.max_length),
                ce_turn_power=float(m.get("ce_turn_power", 0.0)))


def init_source_kind(path: str) -> str:
    """'train' (workdir / step dir), 'orbax' (converted folder) or 'hf'."""
    from fusion_jax.convert.orbax_io import is_orbax_dir
    if os.path.isdir(os.path.join(path, ckpt_lib.CKPT_DIR)) or os.path.isdir(os.path.join(path, "train")):
        return "train"
    if is_orbax_dir(path):
        return "orbax"
    if os.path.isfile(os.path.join(path, "config.json")):
        return "hf"
    raise ValueError(f"config.init_from: {path} is neither a train workdir/checkpoint, a converted "
                     f"Orbax folder (fusion_config.json + params/) nor an HF folder (config.json)")


def resolve_model_config(tc, vocab_size: int | None) -> FusionConfig:
    over = model_overrides(tc)
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
    elif tc.model.preset.startswith("tiny"):
        cfg = presets.tiny_model_config(tc, vocab_size=int(math.ceil((vocab_size or 256) / 8) * 8))
    else:
        cfg = presets.model_preset(tc.model.preset, tc.model.vision_tower)
    if not tc.model.use_card:
        over["use_card"] = False
    if int(tc.model.get("image_token_grid", 0)) > 0:
        over["image_token_grid"] = int(tc.model.image_token_grid)
    return cfg.replace(**over)


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
        vrp = tc.model.vision_remat_policy
        self.abstract_model = step_lib.abstract_model(self.cfg, vision_remat_policy=vrp)
        self.graphdef, abs_state = nnx.split(self.abstract_model)
        self.abstract_params = abs_state.to_pure_dict()
        self.param_sharding = self._param_shardings(abs_state)
        o = tc.optim
        self.total_steps = int(tc.total_steps)
        self.tx, self.labels, self.schedules = optim.make_optimizer(
            self.abstract_params, lr=o.lr, vision_lr=o.vision_lr, total_steps=max(self.total_steps, 1),
            warmup_ratio=o.warmup_ratio, schedule=o.schedule, end_ratio=o.get("end_lr_ratio", 0.0),
            decay_ratio=o.get("decay_ratio", 1.0), weight_decay=o.weight_decay,
            b1=o.b1, b2=o.b2, eps=o.eps, grad_clip=o.grad_clip or None, freeze=o.freeze)
        self.abstract_state = step_lib.abstract_train_state(self.abstract_params, self.tx)
        self.state_sharding = step_lib.train_state_shardings(self.abstract_state, self.param_sharding,
                                                             self.mesh)
        self.train_step = step_lib.make_train_step(
            self.cfg, self.graphdef, self.tx, self.labels, self.mesh, self.state_sharding,
            schedules=self.schedules, opts=step_lib.StepOptions(grad_accum=int(tc.grad_accum)))

    def _param_shardings(self, abs_state):
        def one(v):
            axes = v.get_metadata().get("logical_axes")
            return NamedSharding(self.mesh, spec_for(axes, v.get_value().shape, self.mesh))
        sh = jax.tree.map(one, abs_state, is_leaf=lambda x: isinstance(x, nnx.Variable))
        return jax.tree.map(lambda x: x, sh.to_pure_dict() if hasattr(sh, "to_pure_dict") else dict(sh))

    def sharded_abstract_state(self):
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            self.abstract_state, self.state_sharding)

    def init_params(self):
        """Random init (seeded), or from config.init_from, directly onto the param shardings."""
        tc = self.tc
        if not tc.init_from:
            cfg, vrp, seed = self.cfg, tc.model.vision_remat_policy, int(tc.seed)
            fn = lambda: nnx.split(step_lib.build_model(cfg, seed, vision_remat_policy=vrp))[1].to_pure_dict()
            return jax.jit(fn, out_shardings=self.param_sharding)()
        kind = init_source_kind(tc.init_from)
        abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                self.abstract_params, self.param_sharding)
        if kind == "train":
            return ckpt_lib.restore_params_tree(ckpt_lib.resolve_step_dir(tc.init_from), abstract)
        import fusion_jax
        flat = {".".join(optim.path_str(p).split("/")): s
                for p, s in jax.tree_util.tree_flatten_with_path(self.param_sharding)[0]}
        model = fusion_jax.from_pretrained(tc.init_from, shardings=lambda n, v: flat[n],
                                           dtype=self.cfg.param_dtype)
        params = nnx.split(model)[1].to_pure_dict()
        return jax.tree.map(lambda x, a: x.astype(a.dtype), params, self.abstract_params)

    def init_state(self, params=None):
        params = self.init_params() if params is None else params
        seed = int(self.tc.seed)
        return jax.jit(lambda p: step_lib.init_train_state(p, self.tx, seed),
                       out_shardings=self.state_sharding)(params)


# ----------------------------------------------------------------------------- loop helpers

class _Stopper:
    def __init__(self):
        self.signum = None
        self._old = {}

    def __enter__(self):
        for s in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        if self.signum is not None:  # second signal: give up at once
            raise KeyboardInterrupt
        self.signum = signum
        log(f"\nreceived {signal.Signals(signum).name}: saving a checkpoint after this step, then exiting")

    def __exit__(self, *a):
        for s, h in self._old.items():
            signal.signal(s, h)


def _fmt_time(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _truncate_metrics(path: str, last_step: int):
    if not os.path.isfile(path):
        return
    with open(path) as f:
        keep = [l for l in f if l.strip() and json.loads(l).get("step", 0) <= last_step]
    with open(path, "w") as f:
        f.writelines(keep)


def dataset_size(tc, tokenizer_dir=None) -> int:
    from fusion_jax.data.pipeline import open_source
    return len(open_source(tc.data.path, image_folder=tc.data.image_folder or None, seed=int(tc.seed)))


# ----------------------------------------------------------------------------- train

def train(tc, workdir: str) -> dict:
    """Run (or resume) training; returns a summary dict. Raises TrainingError on NaN/Inf."""
    maybe_initialize_distributed()
    validate(tc)
    workdir = os.path.abspath(workdir)
    is_main = jax.process_index() == 0
    os.makedirs(workdir, exist_ok=True)
    t_setup = time.time()

    # data + tokenizer
    from fusion_jax.data.tokenizer import load_tokenizer
    if tc.data.source == "synth":
        path, image_folder, tok_dir = __import__("fusion_jax.train.data", fromlist=["x"]).prepare_synth(
            workdir, tc.data, log)
        with tc.unlocked():
            tc.data.path, tc.data.image_folder, tc.data.tokenizer = path, image_folder, tok_dir
    tok_dir = tc.data.tokenizer or (ckpt_lib.tokenizer_dir_of(ckpt_lib.resolve_step_dir(tc.init_from))
                                    if tc.init_from and init_source_kind(tc.init_from) == "train"
                                    else os.path.join(tc.init_from, "tokenizer"))
    tokenizer = load_tokenizer(tok_dir)
    wd_tok = os.path.join(workdir, ckpt_lib.TOKENIZER)
    if is_main and os.path.abspath(tok_dir) != wd_tok:
        import shutil
        shutil.copytree(tok_dir, wd_tok, dirs_exist_ok=True)
    if tc.total_steps == -1:
        n = dataset_size(tc)
        with tc.unlocked():
            tc.total_steps = max(1, n // tc.global_batch_size)
        log(f"total_steps = one epoch = {n} samples // {tc.global_batch_size} = {tc.total_steps}")

    s = Setup(tc, workdir, vocab_size=tokenizer.vocab_size)
    cfg = s.cfg
    if cfg.llm.vocab_size < tokenizer.vocab_size:
        raise ValueError(f"config.data.tokenizer: {tokenizer.vocab_size} tokens but the model's vocab is "
                         f"{cfg.llm.vocab_size}")
    if is_main:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(tc.to_json_best_effort(indent=2, sort_keys=True))
        with open(os.path.join(workdir, ckpt_lib.CONFIG), "w") as f:
            f.write(cfg.to_json())

    ck = ckpt_lib.Checkpointer(workdir, keep=int(tc.keep_checkpoints), every=int(tc.checkpoint_every),
                               async_save=bool(tc.async_checkpoint), model_config_json=cfg.to_json(),
                               tokenizer_dir=wd_tok)
    from fusion_jax.train.data import build_iterator, to_device_batch
    per_process = tc.global_batch_size // jax.process_count()
    it = build_iterator(tc.data, cfg, tokenizer, per_process_batch=per_process, seed=int(tc.seed))

    latest = ck.latest_step()
    if latest is not None:
        state, data_state, meta = ck.restore(latest, s.sharded_abstract_state())
        it.set_state(data_state)
        start = int(latest)
        log(f"resumed from {ck.directory}/{latest}")
        if is_main:
            _truncate_metrics(os.path.join(workdir, "metrics.jsonl"), start)
    else:
        params = None
        if int(tc.get("vision_warmup", {}).get("steps", 0)) > 0:
            from fusion_jax.train.tower_warmup import warm_start_tower
            params = s.init_params()
            vw = tc.vision_warmup
            tower, _ = warm_start_tower(cfg, tc.data.image_folder, jax.device_get(params["model"]["vision_tower"]),
                                     steps=int(vw.steps), lr=float(vw.lr), batch_size=int(vw.batch_size),
                                     seed=int(tc.seed), text_images=int(vw.get("text_images", 0)),
                                     image_size=int(tc.data.synth_image_size),
                                     difficulty=str(tc.data.synth_difficulty),
                                     region_bands=int(vw.get("region_bands", 0)),
                                     region_weight=float(vw.get("region_weight", 1.0)),
                                     side_tags=bool(vw.get("side_tags", False)),
                                     dense_tags=bool(vw.get("dense_tags", False)), log=log)
            params["model"]["vision_tower"] = jax.tree.map(
                lambda a, b: jax.device_put(np.asarray(b, a.dtype), a.sharding), params["model"]["vision_tower"], tower)
        if int(tc.get("llm_warmup", {}).get("steps", 0)) > 0:
            from fusion_jax.train.llm_warmup import warm_start_llm
            params = s.init_params() if params is None else params
            lw = tc.llm_warmup
            new, _ = warm_start_llm(cfg, jax.device_get(params), tc.data.image_folder, tokenizer,
                                    steps=int(lw.steps), lr=float(lw.lr), batch_size=int(lw.batch_size),
                                    seq_len=int(lw.seq_len), seed=int(tc.seed), log=log)
            params = jax.tree.map(lambda a, b: jax.device_put(np.asarray(b, a.dtype), a.sharding), params, new)
        state = s.init_state(params)
        start = 0
        log(f"initialized from {tc.init_from or 'scratch (seed %d)' % tc.seed}")
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(s.abstract_params))
    n_frozen = sum(int(np.prod(x.shape)) for x, l in zip(jax.tree.leaves(s.abstract_params),
                                                         jax.tree.leaves(s.labels)) if l == "frozen")
    log(f"model: {n_params:,} params ({n_frozen:,} frozen); mesh {dict(s.mesh.shape)}; "
        f"global batch {tc.global_batch_size} (grad_accum {tc.grad_accum}); {s.total_steps} steps; "
        f"devices {jax.device_count()} x {jax.devices()[0].device_kind}; setup {time.time() - t_setup:.1f}s")

    writer = None
    if is_main and tc.tensorboard:
        from tensorboardX import SummaryWriter
        writer = SummaryWriter(os.path.join(workdir, "tensorboard"))
    mf = open(os.path.join(workdir, "metrics.jsonl"), "a") if is_main else None
    peak = flops_lib.peak_flops()
    meta = {"model_config": cfg.to_dict(), "train_config": json.loads(tc.to_json_best_effort())}

    def meta_now():
        return meta

    pending = None          # (step, metrics (device), batch info, t_dispatch)
    t_last, tok_acc, steps_acc, flops_acc = time.time(), 0, 0, 0.0
    t_run0, step0 = time.time(), start
    last = None
    stopped = None
    step = start
    summary = {"start_step": start}

    def resolve(p):
        nonlocal t_last, tok_acc, steps_acc, flops_acc, last
        k, m, info = p
        m = jax.device_get(m)
        if not bool(m["finite"]):
            raise TrainingError(
                f"step {k}: loss is {float(m['loss'])} (grad norm {float(m['grad_norm'])}): stopping. "
                f"The update of this step was not applied and no checkpoint was written after it; the "
                f"last good checkpoint is {ck.directory}/{ck.latest_step()}. Lower optim.lr, check the "
                f"data of this step, or use compute_dtype=float32.")
        tok_acc += info["tokens"]
        steps_acc += 1
        flops_acc += info["flops"]
        last = m
        if k % tc.log_every == 0 or k == s.total_steps:
            now = time.time()
            dt = max(now - t_last, 1e-9)
            rate = steps_acc / dt
            rec = {"step": k, **{n: float(m[n]) for n in ("loss", "ce_loss", "dsm_loss", "instruct_cos_loss",
                                                          "vision_cos_loss", "grad_norm", "lr", "vision_lr")},
                   "num_targets": int(m["num_targets"]), "tokens_per_s": tok_acc / dt, "steps_per_s": rate,
                   "tflops_per_s": flops_acc / dt / 1e12, "query_len": info["q"], "seq_len": info["S"],
                   "time": now}
            if peak:
                rec["mfu"] = flops_acc / dt / (peak * jax.device_count())
            eta = (s.total_steps - k) / max((k - step0) / max(now - t_run0, 1e-9), 1e-9)
            rec["eta_s"] = eta
            if is_main:
                mf.write(json.dumps(rec) + "\n")
                mf.flush()
                if writer is not None:
                    for n, v in rec.items():
                        if n not in ("step", "time") and isinstance(v, (int, float)):
                            writer.add_scalar(f"train/{n}", v, k)
                mfu = f" | MFU {100 * rec['mfu']:.1f}%" if "mfu" in rec else ""
                log(f"step {k}/{s.total_steps} | loss {rec['loss']:.4f} (ce {rec['ce_loss']:.4f}, "
                    f"dsm {rec['dsm_loss']:.4f}) | lr {rec['lr']:.2e} | gnorm {rec['grad_norm']:.3f} | "
                    f"{rec['tokens_per_s']:,.0f} tok/s | {rate:.2f} step/s{mfu} | ETA {_fmt_time(eta)}")
            t_last, tok_acc, steps_acc, flops_acc = now, 0, 0, 0.0

    try:
        with _Stopper() as stop:
            while step < s.total_steps:
                raw = next(it)
                batch = to_device_batch(raw, s.mesh)
                info = {"tokens": int(np.asarray(raw["attention_mask"]).sum()) * jax.process_count(),
                        "q": int(raw["query_len"]), "S": int(np.asarray(raw["token_ids"]).shape[1]),
                        "flops": flops_lib.train_flops_per_step(cfg, {k: v.shape for k, v in batch.items()})}
                state, metrics = s.train_step(state, batch)
                step += 1
                if pending is not None:
                    resolve(pending)
                pending = (step, metrics, info)
                halt = stop.signum is not None or (tc.stop_after > 0 and step - start >= tc.stop_after)
                if step % tc.checkpoint_every == 0 or halt or step == s.total_steps:
                    resolve(pending)
                    pending = None
                    ck.save(step, state, it.get_state(), meta_now(), force=True)
                if halt:
                    stopped = ("signal " + signal.Signals(stop.signum).name) if stop.signum else "stop_after"
                    break
            if pending is not None:
                resolve(pending)
    finally:
        ck.close()
        it.close()
        if mf:
            mf.close()
        if writer is not None:
            writer.close()
    summary.update(step=step, stopped=stopped, wall_s=time.time() - t_run0,
                   last={k: float(v) for k, v in (last or {}).items()})
    if stopped:
        log(f"stopped at step {step} ({stopped}); checkpoint saved. Rerun the same command to resume.")
    else:
        log(f"done: {step} steps in {_fmt_time(time.time() - t_run0)}; final checkpoint "
            f"{ck.directory}/{step}")
    return summary
