"""Released weights in and out: ViT .npz checkpoints and Hugging Face directories.

    from tfx_jax import pretrained
    cfg, params = pretrained.load_vit_npz(path, num_classes=None, image_size=None)
    cfg, params = pretrained.load_hf(directory)        # config.json + *.safetensors
    cfg, params = pretrained.load_hf(directory, mesh=mesh)  # each device reads its block
    cfg = pretrained.load_hf_config(directory)         # a decoder's config.json only
    pretrained.save_hf(cfg, params, directory)         # loadable by transformers
    tokenizer = pretrained.load_tokenizer(directory)   # tokenizer.json + BOS/EOS/pad ids
    cfg = tfx.CausalLMConfig.preset("llama3.2-1b")     # released shapes, no weights

The returned ``cfg`` is a :class:`tfx_jax.ViTConfig` or
:class:`tfx_jax.CausalLMConfig`; ``params`` go straight into
``model.apply({"params": params}, ...)``. See docs/pretrained.md for the
checkpoint families each loader accepts.

  tensors.py    checked access to a checkpoint's named tensors (one error per problem)
  layers.py     per-layer <-> nn.scan-stacked parameter layouts
  tree.py       flat "a/b/c" names of our parameter trees
  posemb.py     2-D interpolation of ViT position embeddings
  vit_adapt.py  a new zero head / another resolution for fine-tuning
  vit_npz.py    google-research/vision_transformer and big_vision .npz files
  hf_files.py   config.json + safetensors (lazy, sharded) + tokenizer.json on disk
  hf_gpt2.py    GPT2LMHeadModel <-> CausalLM tensor map
  hf_decoders.py  Llama / Mistral / Qwen2 / Qwen3 / Gemma 1-3 <-> CausalLM config and tensors
  hf_vit.py     ViTModel / ViTForImageClassification <-> ViT tensor map
  hf.py         load_hf / save_hf
"""
from tfx_jax import lazy_attributes

# name -> module: loaded on first use (PEP 562), so that importing this package (the LM
# job does, for its optional init_from) costs nothing until a checkpoint is read
_EXPORTS = {"load_hf": "hf", "load_hf_config": "hf", "save_hf": "hf",
            "CheckpointTokenizer": "hf_files", "load_tokenizer": "hf_files",
            "from_scan": "layers", "to_scan": "layers",
            "resize_position_embedding": "posemb", "load_vit_npz": "vit_npz"}
_SUBMODULES = ("tensors", "layers", "tree", "posemb", "vit_adapt", "vit_npz", "hf_files",
               "hf_gpt2", "hf_decoders", "hf_vit", "hf")
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_attributes(__name__, _EXPORTS, _SUBMODULES)
