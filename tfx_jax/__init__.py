"""tfx_jax: the Transformer family as pure Flax modules."""
from tfx_jax.attention import attention_weights, causal_mask, dot_product_attention

__all__ = ["attention_weights", "causal_mask", "dot_product_attention"]
