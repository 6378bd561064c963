"""Generation, split by job:

  decoding  on the device: jitted prefill (interaction layers) + KV-cache decode loop, sampling
  prompts   on the host: chat templates -> token ids -> laid-out batch; ids -> answer strings
  loading   checkpoints (Orbax, HF, train step dirs) and their tokenizer folders
  cli       `python -m fusion_jax.generate --ckpt DIR --image PATH --prompt "..."`

The public names below are importable from `fusion_jax.generate`.
"""
from fusion_jax.generate.decoding import (
    MAX_EOS,
    TRACES,
    decode_step,
    generate,
    generate_nocache,
    pick_token,
    prefill,
    prefill_inputs,
)
from fusion_jax.generate.loading import find_tokenizer_dir, load_model, load_params
from fusion_jax.generate.prompts import (
    CONVENTIONS,
    GenerationConfig,
    answer,
    check_context,
    cut_at_stop,
    decode_outputs,
    default_template,
    encode_request,
    image_question,
    layout_padded,
    load_image_crops,
    open_image,
    pick_query_len,
    render_prompt,
    stop_strings,
    stop_token_ids,
)

__all__ = ["CONVENTIONS", "MAX_EOS", "TRACES", "GenerationConfig", "answer", "check_context", "cut_at_stop",
           "decode_outputs", "decode_step", "default_template", "encode_request", "find_tokenizer_dir", "generate",
           "generate_nocache", "image_question", "layout_padded", "load_image_crops", "load_model", "load_params",
           "open_image", "pick_query_len", "pick_token", "prefill", "prefill_inputs", "render_prompt", "stop_strings",
           "stop_token_ids"]
