"""Input pipelines: TFDS dataset builders, data sources, tokenizers and Grain pipelines."""
