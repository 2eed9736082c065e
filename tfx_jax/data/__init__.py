"""Input data for tfx_jax: TFDS datasets and builders read through Grain.

Text (docs/data_text.md): `number_words` / `number_words_dataset` (the built-in
English -> German/Korean number-word builder), `tsv_pairs`, `tfds_translation`,
`pair_sources` (config value -> pairs), `tsv_pairs` (a TSV file), `tokenizer` (SentencePiece), `text_pipeline`.

Vision (docs/data_vision.md): `digits` (the built-in scikit-learn digits
builder), `image_datasets` (config value -> dataset), `image_pipeline`
(training / evaluation batches), `image_files` (prediction input), with
`grain_batches` holding the batching contract all pipelines share.
"""
