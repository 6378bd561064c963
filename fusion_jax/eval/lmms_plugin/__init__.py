"""lmms-eval model plugin `fusion_jax` (lmms-eval 0.7.x finds it through the entry point
group `lmms_eval.models`, declared in pyproject.toml):

    lmms-eval --model fusion_jax --model_args pretrained=CKPT_DIR[,batch_size=8,dtype=bfloat16,mesh=1:-1:1] \\
        --tasks pope --batch_size 8

`manifest()` is the entry point's payload; the model class is `model.FusionJax`, and the
log-likelihood scoring it uses (`scoring`, no lmms-eval import) is usable on its own.
"""
from __future__ import annotations

MODEL_ID = "fusion_jax"
CLASS_PATH = "fusion_jax.eval.lmms_plugin.model.FusionJax"


def manifest():
    from lmms_eval.models.registry_v2 import ModelManifest
    return ModelManifest(model_id=MODEL_ID, simple_class_path=CLASS_PATH)
