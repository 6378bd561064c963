"""Interactive multi-turn chat with a FUSION checkpoint: `python -m fusion_jax.chat --ckpt DIR`."""
from fusion_jax.chat.session import ChatSession, conversation_batch, fixed_instructs

__all__ = ["ChatSession", "conversation_batch", "fixed_instructs"]
