"""Applications built on the model chapters and the training library.

  classification.py   image classification task (ViT on digits / TFDS images)
  attention_maps.py   [CLS] -> patch attention maps of a trained ViT
  translation/        the main job: sequence transduction with the encoder-decoder
  dalle/              DALL-E-style text-to-image generation with a causal LM
"""
