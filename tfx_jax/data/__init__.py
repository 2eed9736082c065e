"""Input data for tfx_jax: TFDS datasets and builders read through Grain.

Text (docs/data_text.md):
  number_words.py     the built-in offline TFDS builder of number-word pairs and its
                      grammar (numbers as words in English, German, Korean)
  number_lists.py     lists of numbers: a corpus whose lengths spread like sentences'
  text_pairs.py       one entry point from a config value to (source, target) pairs: a
                      user's TSV file, a TFDS translation dataset, number_words
  tokenizer.py        SentencePiece shared vocabulary, the project's special token ids,
                      a run's tokenizer in its workdir
  length_caps.py      row lengths from the data's length distribution
  packing.py          several short examples in one row, and whether to pack
  text_pipeline.py    Grain pipelines: text pairs -> fixed-shape token batches

Vision (docs/data_vision.md):
  digits.py           the built-in scikit-learn digits TFDS builder
  image_datasets.py   one entry point: a config value -> an image dataset
  image_preprocess.py pixel conventions (normalisation, resizing) shared by all uses,
                      and image files -> model input, for prediction
  image_pipeline.py   Grain pipelines: training (augmented) / evaluation image batches

Shared: grain_batches.py, the process-local batching contract every pipeline keeps.
"""
