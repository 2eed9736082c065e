"""Default config of experiments/translate.py: a small Transformer on number_words.

English number words -> German number words ("three hundred forty five" ->
"dreihundertfünfundvierzig"), built in and generated offline. Tuned to reach
>= 95% exact match on the held-out test numbers within 10 minutes on a 2-core
CPU, data preparation and compilation included (docs/translate.md has the
measured curve). Other data:

    # your parallel corpus, one "source<TAB>target" pair per line
    python experiments/translate.py --workdir=/tmp/tsv \
        --config.train_data=train.tsv --config.eval_data=eval.tsv
    # a TFDS translation dataset prepared in ArrayRecord format, with the paper's base model
    python experiments/translate.py --workdir=/tmp/wmt --config.dataset=wmt14_translate/de-en \
        --config.data_dir=/data/tfds --config.source_language=en --config.target_language=de \
        --config=experiments/configs/translate.py:base  (see get_config's argument)
"""
import ml_collections
from ml_collections import config_dict

from tfx_jax import train as tr


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    """The default (small, number_words) config; ``"base"`` gives the paper's base model."""
    config = tr.default_config()

    # Data. `dataset` names the splits of a dataset: "number_words" (built in; or
    # "number_words/en_ko") or a TFDS translation dataset such as "wmt14_translate/de-en".
    # `train_data` / `eval_data` / `test_data`, when set, replace a split by a TSV file
    # (any name: .tsv, .txt, ...) or another dataset spec. A TSV corpus needs only
    # train_data: without eval_data a seeded `eval_holdout` fraction of it (at most 1,000
    # pairs) is held out for evaluation and the final test; with eval_data the final
    # test runs on eval_data (or test_data if set).
    config.dataset = "number_words"
    config.train_data = ""
    config.eval_data = ""
    config.test_data = ""
    config.train_split = "train"
    config.eval_split = "validation"
    config.test_split = "test"
    config.eval_holdout = 0.05
    config.tsv_header = "auto"  # skip a "source<TAB>target"-like first line; "skip" / "keep"
    config.data_dir = config_dict.placeholder(str)  # TFDS data_dir (None: TFDS's default)
    config.source_language = config_dict.placeholder(str)  # None: the dataset's direction
    config.target_language = config_dict.placeholder(str)
    config.data_in_memory = True  # read dataset splits into RAM (fast; off for huge corpora)
    # number_words only: which numbers, how many per split (each choice is its own
    # TFDS config, generated on first use under data_dir); numbers below
    # train_all_below are all in train, small_number_repeats times each.
    config.number_words = ml_collections.ConfigDict(dict(
        max_number=999_999, train_size=50_000, validation_size=1_000, test_size=2_000,
        split_seed=0, train_all_below=1_000, small_number_repeats=5))

    # Model size: "auto" sizes the model, vocabulary, dropout, batch, learning rate and
    # warm-up (and decoding batch) from the data (number_words: "tiny", today's tuned model; a user corpus: by
    # its number of training pairs, see tfx_jax/apps/translation/experiment.py, size_for),
    # or a named size: "tiny", "small" (the IWSLT'14 Transformer), "base" (Vaswani et al.
    # 2017). The keys below that are None are the size's; a value you set always wins
    # (--config.model.d_model=256, --config.vocab_size=8000, --config.learning_rate=3e-4).
    # config.json keeps the values the run decided.
    config.model_size = "auto"

    # Tokenizer: one SentencePiece vocabulary for both languages, cached in the workdir.
    config.vocab_size = config_dict.placeholder(int)  # an upper bound: a small corpus gets
    # what it supports (None: the model size's)
    config.tokenizer_type = "bpe"  # "bpe" (the paper) or "unigram"
    config.split_digits = True  # one piece per digit: numbers are copied, not memorised
    # Tokens per row, EOS included; longer rows are cut. 0: from the data (measured on up
    # to 10,000 pairs when training starts, kept in config.json): the longest pair that
    # is at most `outlier_factor` x the `length_percentile` length (so one 10,000-token
    # line cannot set the row length of every batch; the run prints how many it cuts).
    config.max_source_length = 0
    config.max_target_length = 0
    config.length_percentile = 99.0
    config.outlier_factor = 2.0
    config.drop_overlong = False  # True: leave too-long training pairs out instead
    # Several pairs per training row, source and target packed in parallel with segment
    # ids and positions (tfx_jax.data.packing): fewer padding tokens per step. "auto" packs
    # when that puts >= 1.25x more real tokens in a row (measured on the first batches;
    # a corpus with a spread of lengths: yes; number_words, 13% padding: no); "true" /
    # "false" force it.
    config.packing = "auto"

    # Model: any TransformerConfig field except vocab_size / max_len (from the data); the
    # placeholders (None) are decided by config.model_size.
    config.model = ml_collections.ConfigDict(dict(
        d_model=config_dict.placeholder(int), num_heads=config_dict.placeholder(int),
        num_encoder_layers=config_dict.placeholder(int),
        num_decoder_layers=config_dict.placeholder(int), d_ff=config_dict.placeholder(int),
        dropout_rate=config_dict.placeholder(float), attention_dropout_rate=0.0,
        pre_norm=False, activation="relu",
        share_embeddings=True, position="sinusoidal", dtype="float32",
        attention_implementation="auto", scan_layers=False, remat_policy="none"))

    # Training: the paper's Adam (0.9, 0.98, 1e-9), label smoothing 0.1.
    config.label_smoothing = 0.1
    config.batch_size = config_dict.placeholder(int)  # None: the model size's (rows per step)
    # Training length: num_train_steps, or num_epochs of the training pairs; with both 0
    # the default: 600 steps for number_words (tuned, docs/translate.md), and for a user
    # corpus `epochs` epochs within [min_steps, max_steps]. The run prints the epochs.
    config.num_train_steps = 0
    config.num_epochs = 0.0
    config.auto_train_length = ml_collections.ConfigDict(dict(
        number_words_steps=600, epochs=10.0, min_steps=1000, max_steps=100_000))
    # config.early_stopping_patience = N stops after N evaluations without a better
    # eval loss (config.best_metric); the best checkpoint is kept either way.
    config.schedule = "warmup_cosine"
    config.learning_rate = config_dict.placeholder(float)  # None: the model size's (peak)
    config.warmup_steps = config_dict.placeholder(int)  # None: the size's, <= 1/5 of the run
    config.grad_clip_norm = 1.0
    config.log_every_steps = 100
    config.eval_every_steps = 200
    config.checkpoint_every_steps = 200
    config.data_threads = 0  # Grain threads tokenizing; 0 = in the main thread

    # Evaluation and decoding: greedy during training (cheap), beam search (beam 4,
    # alpha 0.6 as the paper) for the final test evaluation and --translate.
    config.eval_batch_size = config_dict.placeholder(int)  # None: the model size's
    config.eval_beam_size = 1
    config.beam_size = 4
    config.alpha = 0.6
    config.bleu_tokenize = config_dict.placeholder(str)  # None: "char" for number_words
    config.num_examples_to_print = 8

    if variant == "base":  # Vaswani et al. 2017, base model, schedule of eq. 3
        config.update(model_size="base", max_source_length=128, max_target_length=128,
                      drop_overlong=True, num_train_steps=100_000,
                      schedule="transformer", learning_rate=1.0, warmup_steps=4000,
                      schedule_d_model=512, grad_clip_norm=0.0, eval_every_steps=5000,
                      checkpoint_every_steps=5000, eval_batch_size=256,
                      data_in_memory=False)
    elif variant:
        raise ValueError(f"unknown config variant {variant!r}; expected '' or 'base'")
    return config
