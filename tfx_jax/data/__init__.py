"""Input data for tfx_jax: TFDS datasets and builders read through Grain.

Vision (see docs/data_vision.md): `digits` (the built-in scikit-learn digits
builder), `image_datasets` (config value -> dataset), `image_pipeline`
(training / evaluation batches), `image_files` (prediction input), with
`grain_batches` holding the batching contract all pipelines share.
"""
