"""Input data for tfx_jax: TFDS datasets and builders read through Grain.

Text (docs/data_text.md):
  number_words_grammar.py  spelling numbers as words (English, German, Korean)
  number_words_dataset.py  the built-in offline TFDS builder of number-word pairs
  tsv_pairs.py             a user's parallel corpus as a TSV file
  tfds_translation.py      translation datasets from the TFDS catalogue
  pair_sources.py          one entry point: a config value -> (source, target) pairs
  tokenizer.py             SentencePiece shared vocabulary; the project's special token ids
  text_pipeline.py         Grain pipelines: text pairs -> fixed-shape token batches

Vision (docs/data_vision.md):
  digits.py                the built-in scikit-learn digits TFDS builder
  image_datasets.py        one entry point: a config value -> an image dataset
  image_preprocess.py      pixel conventions (normalisation) shared by all uses
  image_augment.py         label-preserving training augmentation
  image_pipeline.py        Grain pipelines: training / evaluation image batches
  image_files.py           image files -> model input, for prediction

Shared: grain_batches.py, the process-local batching contract every pipeline keeps.
"""
