"""Applications built on the model chapters, the data package and the training library.

Each app holds what its script in experiments/ needs, so the script stays thin. An app
builds its model config with ``tfx_jax.model_config.from_config_dict`` and its training
Task with a factory of one shape, ``<app>_task(model_config, *, <sizes the data fixed>,
<loss options>, evaluate=None) -> tfx_jax.train.Task`` (see tfx_jax/train/state.py), and
its run in one shape (``experiment.py``): check the config, check and lock the workdir,
read the data, resolve a frozen plan (``tfx_jax.train.freeze``), one Task, train, report.

  classification/     image classification with ViT: task and inference (task), the run
                      and prediction / attention maps (experiment)
  attention_maps.py   [CLS] -> patch attention maps of a trained ViT
  figures.py          matplotlib figures written as PNG through the path layer (gs:// too)
  translation/        the main job: sequence transduction with the encoder-decoder
                      (task, inference: greedy and beam, evaluation: exact match and BLEU)
  dalle/              DALL-E-style text-to-image generation with a causal LM (image
                      tokenizers, prompts, the joint text+image stream, task, generation,
                      evaluation)
  language_model/     GPT-style language modelling: the built-in corpus (the Python
                      standard library's source), packed pipelines, task with perplexity,
                      batched sampling with temperature / top-k / top-p, and the checked
                      run (experiment: config checks, packing decision, --generate prompts)
"""
