"""tfx_jax: the Transformer family as pure Flax Linen modules.

The chapters of the story, one file each:
  attention.py    scaled dot-product attention (the T x S score matrix)
  multihead.py    multi-head attention with W_o and a key/value cache
  position.py     sinusoidal and learned positional encodings, per-token positions
  rotary.py       rotary position embeddings (RoPE) applied to queries and keys
  blocks.py       the Transformer block (attention + FFN, residual, LayerNorm) and its stack
  transformer.py  the encoder-decoder for sequence transduction
  vit.py          the Vision Transformer: image patches as words
  lm.py           the decoder-only causal LM behind DALL-E-style generation
  decoding.py     autoregressive decoding: sampling, greedy and beam search
"""
from tfx_jax import decoding
from tfx_jax.attention import attention_weights, causal_mask, dot_product_attention
from tfx_jax.blocks import (BlockStack, FeedForward, TransformerBlock, key_padding_mask,
                            padding_lengths)
from tfx_jax.model_config import StackConfig
from tfx_jax.lm import CausalLM, CausalLMConfig
from tfx_jax.multihead import MultiHeadAttention
from tfx_jax.position import (AddPositionEncoding, SequenceLayout, positions_from_segment_ids,
                              sinusoidal_position_encoding)
from tfx_jax.rotary import apply_rotary
from tfx_jax.transformer import Decoder, Encoder, Transformer, TransformerConfig
from tfx_jax.vit import ViT, ViTConfig

__version__ = "0.1.0"

__all__ = [
    "AddPositionEncoding", "BlockStack", "CausalLM", "CausalLMConfig", "Decoder", "Encoder",
    "FeedForward", "MultiHeadAttention", "StackConfig", "Transformer", "TransformerBlock",
    "TransformerConfig", "ViT", "ViTConfig", "attention_weights", "causal_mask",
    "decoding", "dot_product_attention", "key_padding_mask", "sinusoidal_position_encoding",
    "SequenceLayout", "apply_rotary", "padding_lengths", "positions_from_segment_ids",
]
