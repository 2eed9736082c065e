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

Every name above (``tfx.Transformer``, ``tfx.decoding``, ``tfx.train``) is imported on its
first use (``lazy_attributes``, PEP 562), so a translation run loads the encoder-decoder's
chapters and not the ViT's or the LM's; the TPU and GPU kernels load where they are chosen.

Scripts in experiments/ are thin: they parse flags and call an app. docs/ARCHITECTURE.md
follows one training step from config file to checkpoint.
"""
import importlib
import sys

# name -> module, imported on first use (PEP 562): ``import tfx_jax as tfx`` costs nothing,
# and a translation run loads the encoder-decoder's chapters, not the ViT's or the LM's
_EXPORTS = {
    "attention_weights": "attention", "causal_mask": "attention",
    "dot_product_attention": "attention",
    "BlockStack": "blocks", "FeedForward": "blocks", "TransformerBlock": "blocks",
    "padding_lengths": "blocks",
    "context_parallel_attention": "context_parallel",
    "StackConfig": "model_config",
    "CausalLM": "lm", "CausalLMConfig": "lm",
    "MultiHeadAttention": "multihead",
    "AddPositionEncoding": "position", "SequenceLayout": "position",
    "positions_from_segment_ids": "position", "sinusoidal_position_encoding": "position",
    "apply_rotary": "rotary",
    "Decoder": "transformer", "Encoder": "transformer", "Transformer": "transformer",
    "TransformerConfig": "transformer",
    "ViT": "vit", "ViTConfig": "vit",
}
_SUBMODULES = ("attention", "attention_chunked", "attention_cudnn", "attention_dropout",
               "attention_splash", "blocks", "context_parallel", "decoding", "errors", "lm",
               "logical_axes", "model_config", "multihead", "position", "rotary",
               "transformer", "vit", "data", "train", "apps", "pretrained")

__version__ = "0.1.0"
__all__ = sorted([*_EXPORTS, "decoding"])


def lazy_attributes(package: str, exports: dict, submodules=()):
    """A package's ``__getattr__`` and ``__dir__`` (PEP 562) that import on first use:
    ``exports`` maps a name to the submodule defining it; ``submodules`` are given as
    attributes too (``tfx.decoding``, ``pretrained.hf_files``)."""
    def __getattr__(name: str):
        if name in submodules:
            return importlib.import_module(f"{package}.{name}")
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{exports[name]}"), name)

    def __dir__():
        return sorted({*vars(sys.modules[package]), *exports, *submodules})

    return __getattr__, __dir__


__getattr__, __dir__ = lazy_attributes(__name__, _EXPORTS, _SUBMODULES)
