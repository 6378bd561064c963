"""The lmms-eval model class `fusion_jax` (a "simple" model: context strings plus visuals).

generate_until: each request is answered as `python -m fusion_jax.eval` answers a question
(`runner.run_eval`): its own prompt, its own instructs (the reference's adapter used the
first request's instructs for the whole batch, so its batch sizes above 1 were wrong), its
own max_new_tokens; requests are grouped by their sampling settings, and each answer is cut
at its own `until` strings. Only the first visual of a request is used (FUSION takes one
image). loglikelihood: `scoring.loglikelihoods` (batched, per-request images), returned as
lmms-eval 0.7.3 consumes it: the negative log-likelihood (its multiple_choice takes the argmin).
"""
from __future__ import annotations

import json
import types

from lmms_eval.api.instance import GenerationResult, Instance
from lmms_eval.api.model import lmms
from loguru import logger

from fusion_jax.eval.lmms_plugin.scoring import clean_context, loglikelihoods

SAMPLING_KEYS = ("temperature", "top_p", "top_k", "do_sample", "num_beams")


class FusionJax(lmms):
    is_simple = True

    def __init__(self, pretrained: str, tokenizer: str | None = None, conv_template: str | None = None,
                 query_len=None, dtype: str | None = None, mesh: str | None = None, batch_size=1,
                 seq_bucket=64, instruct_bucket=0, max_new_tokens=1024, **kwargs):
        super().__init__()
        from fusion_jax.eval.scale import load_for_eval
        args = types.SimpleNamespace(ckpt=pretrained, tokenizer=tokenizer, image_grid=None, early_mask_mode=None,
                                     query_len=None if query_len is None else int(query_len), dtype=dtype,
                                     mesh=mesh.replace(":", ",") if isinstance(mesh, str) else mesh)
        self.tok, self.model = load_for_eval(args)
        self.template, self.query_len = conv_template, args.query_len
        self.batch_size_per_gpu = int(batch_size or 1)
        self.seq_bucket, self.instruct_bucket = int(seq_bucket), int(instruct_bucket)
        self.max_new_tokens = int(max_new_tokens)
        unused = {k: v for k, v in kwargs.items() if k not in ("device", "max_batch_size") and v is not None}
        if unused:
            logger.warning(f"fusion_jax: ignoring model args {unused}")

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    def _doc(self, task, split, doc_id):
        return self.task_dict[task][split][doc_id]

    def _image(self, doc_to_visual, doc):
        visuals = doc_to_visual(doc) if doc_to_visual is not None else None
        while isinstance(visuals, (list, tuple)):
            visuals = visuals[0] if visuals else None
        return visuals.convert("RGB") if visuals is not None and hasattr(visuals, "convert") else None

    def _gcfg(self, kw: dict):
        from fusion_jax.generate import GenerationConfig
        temp = float(kw.get("temperature") or 0.0) if kw.get("do_sample", True) else 0.0
        return GenerationConfig(max_new_tokens=self.max_new_tokens, temperature=temp,
                                top_k=int(kw.get("top_k") or 0), top_p=float(kw.get("top_p") or 1.0),
                                query_len=self.query_len, template=self.template, seq_bucket=self.seq_bucket,
                                instruct_bucket=self.instruct_bucket)

    def generate_until(self, requests: list[Instance]) -> list[str]:
        from fusion_jax.eval.runner import run_eval
        from fusion_jax.generate.prompts import cut_at_stop
        groups: dict[str, list] = {}
        for k, req in enumerate(requests):
            context, gen_kwargs, doc_to_visual, doc_id, task, split = req.args
            kw = dict(gen_kwargs or {})
            key = json.dumps({s: kw.get(s) for s in SAMPLING_KEYS}, sort_keys=True, default=str)
            q = {"question_id": k, "text": clean_context(context),
                 "image": self._image(doc_to_visual, self._doc(task, split, doc_id)),
                 "max_new_tokens": int(kw.get("max_new_tokens") or self.max_new_tokens)}
            groups.setdefault(key, []).append((q, kw))
        texts = [""] * len(requests)
        for items in groups.values():
            failures = []
            rows = run_eval(self.model, self.tok, [q for q, _ in items], image_folder=None,
                            gcfg=self._gcfg(items[0][1]), batch_size=self.batch_size, progress=self.rank == 0,
                            failures=failures)
            until = {q["question_id"]: kw.get("until") for q, kw in items}
            for r in rows:
                stops = until[r["question_id"]]
                texts[r["question_id"]] = cut_at_stop(r["text"], [stops] if isinstance(stops, str) else stops)
            for f in failures:
                logger.warning(f"fusion_jax: request {f['question_id']} not answered: {f['reason']}")
        for req, text in zip(requests, texts, strict=True):
            self.cache_hook.add_partial("generate_until", (req.args[0], req.args[1]), text)
        return texts

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        items = []
        for req in requests:
            context, target, doc_to_visual, doc_id, task, split = req.args
            doc = self._doc(task, split, doc_id)
            continuation = target if isinstance(target, str) else target(doc)
            items.append((context, continuation, self._image(doc_to_visual, doc)))
        out = loglikelihoods(self.model, self.tok, items, template=self.template, query_len=self.query_len,
                             batch_size=self.batch_size, seq_bucket=self.seq_bucket,
                             instruct_bucket=self.instruct_bucket)
        # lmms-eval 0.7.3 ranks multiple-choice continuations by argmin, because its models (the
        # reference's adapter too) return a loss: hand it the negative log-likelihood, summed
        out = [(-lp, greedy) for lp, greedy in out]
        for req, res in zip(requests, out, strict=True):
            self.cache_hook.add_partial("loglikelihood", (req.args[0], req.args[1]), res)
        # its evaluator also passes every response through `unwrap_generation_output`, which turns
        # a tuple into its str(); wrapped, the tuple reaches the metrics intact
        return [GenerationResult(text=res) for res in out]

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("fusion_jax: multi-round generation is not supported; use python -m fusion_jax.chat")
