"""tfx_jax: the Transformer family as pure Flax Linen modules, and a library to train them.

Layers (each imports only those above it; models import neither data nor train):

Models, the chapters of the story, one file each (``import tfx_jax as tfx``):
  attention.py          scaled dot-product attention (the T x S score matrix), one function
                        every module calls; it dispatches to the implementations below
  attention_chunked.py  memory-efficient attention: linear extra memory, forward and backward
  attention_cudnn.py    the GPU flash-attention path (cuDNN, via jax.nn.dot_product_attention)
  attention_splash.py   the TPU path: Pallas splash attention with mask objects
  attention_dropout.py  attention dropout as a counter-based mask, regenerated per tile
  context_parallel.py   context parallelism: one sequence split over devices (ring, all_gather)
  multihead.py          multi-head attention with W_o and a key/value cache
  position.py           sinusoidal and learned positional encodings, per-token positions
  rotary.py             rotary position embeddings (RoPE) applied to queries and keys
  logical_axes.py       logical names of parameter dimensions (embed, heads, mlp, vocab, ...)
                        so a mesh can shard them; plain arrays unless the library records them
  model_config.py       model options: StackConfig (shared by every model), validators and
                        from_config_dict (an experiment's config.model -> a model config)
  blocks.py             the Transformer block (attention + FFN, residual, LayerNorm) and its stack
  transformer.py        the encoder-decoder for sequence transduction
  vit.py                the Vision Transformer: image patches as words
  lm.py                 the decoder-only causal LM behind DALL-E-style generation
  decoding.py           autoregressive decoding: sampling, greedy and beam search

Library packages (import them explicitly):
  data/        input data: TFDS datasets and builders read through Grain, tokenizers (the
               project's one set of special token ids: data/tokenizer.py), text and image
               pipelines; see tfx_jax/data/__init__.py
  train/       task-agnostic training: run options (run_config.py), mesh, optimizer,
               compiled step, Orbax checkpoints, metrics, preemption, the loop and the
               script launcher; see tfx_jax/train/__init__.py
  apps/        applications of models + data + train: classification, attention maps,
               translation, language modelling, DALL-E-style generation; see
               tfx_jax/apps/__init__.py
  pretrained/  released weights in and out (ViT .npz, Hugging Face safetensors)

Scripts in experiments/ are thin: they parse flags and call an app. docs/ARCHITECTURE.md
follows one training step from config file to checkpoint.
"""
from tfx_jax import decoding
from tfx_jax.attention import attention_weights, causal_mask, dot_product_attention
from tfx_jax.blocks import (BlockStack, FeedForward, TransformerBlock,
                            padding_lengths)
from tfx_jax.context_parallel import context_parallel_attention
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
    "context_parallel_attention",
    "decoding", "dot_product_attention", "sinusoidal_position_encoding",
    "SequenceLayout", "apply_rotary", "padding_lengths", "positions_from_segment_ids",
]
