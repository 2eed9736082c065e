"""Default config of experiments/lm.py: a small GPT-style LM on the Python standard library.

The built-in corpus is the source of the Python standard library that runs
the script (test suites left out; ~12 MB of code for CPython 3.11), cut into
blank-line-separated blocks, 2% of the files held out by a hash of their path.
Rows of 128 tokens are packed with several blocks each when that pays
(``packing = "auto"``: it does for these blocks, ~2x real tokens per row). Other data:

    # lm1b (one sentence per example), prepared as ArrayRecord under DIR
    python experiments/lm.py --workdir=/tmp/lm1b --config.dataset=lm1b --config.data_dir=DIR
    # your own directory of .py / .txt / .md files
    python experiments/lm.py --workdir=/tmp/mine --config.dataset=/path/to/dir
    # a GPT-2-small-sized model with rotary positions and grouped-query attention (accelerator)
    python experiments/lm.py --workdir=/tmp/gpt --config=experiments/configs/lm.py:gpt2
"""
import ml_collections
from ml_collections import config_dict

from tfx_jax import train as tr
from tfx_jax.apps.language_model.task import default_model_section


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    """The default (small, CPU-sized) config; ``"gpt2"`` gives a GPT-2-small-sized model."""
    config = tr.default_config()

    # Data: "python_stdlib" (built in), a directory of text files, a text file, a JSONL file
    # of {"prompt": ..., "response": ...} lines (loss on the responses), or a TFDS name.
    config.dataset = "python_stdlib"
    config.data_dir = config_dict.placeholder(str)  # TFDS data_dir (None: TFDS's default)
    config.train_split = "train"  # TFDS splits (lm1b has train and test)
    config.eval_split = "test"
    config.text_key = "text"      # the TFDS text feature
    config.eval_fraction = 0.02   # built-in / directory corpus: share of files held out
    config.max_files = config_dict.placeholder(int)  # first N files only (quick runs)
    config.max_eval_examples = 400  # held-out examples scored at each evaluation

    # Tokenizer: SentencePiece BPE, trained on a sample of the training text, cached.
    config.vocab_size = 2048
    config.tokenizer_type = "bpe"
    config.tokenizer_max_chars = 1_000_000  # characters of training text for the tokenizer

    # Rows and packing.
    config.max_len = 128          # tokens per row (the model's context)
    config.packing = "auto"       # several examples per row (segment ids + positions) when
    #                               that gives >= 1.25x real tokens per row; "true"/"false"
    config.num_packing_bins = 0   # rows the packer fills at once; 0 = the local batch
    config.data_threads = 0       # Grain threads tokenizing; 0 = in the main thread

    # Model: every CausalLMConfig field except vocab_size / max_len (tfx_jax/lm.py and
    # model_config.py document them), e.g. position "learned" (GPT), "sinusoidal" or "rope";
    # num_kv_heads < num_heads: grouped-query attention (None: off); norm="rms_norm",
    # mlp="gated", activation="silu": Llama's block. With config.init_from the checkpoint
    # fixes the architecture: only dropout_rate, attention_dropout_rate, dtype,
    # attention_implementation, scan_layers and remat_policy apply then.
    config.model = default_model_section()
    # Positions per row whose logits the loss holds at once (0: decided from the rows each
    # device holds: whole rows when their logits are at most 2^23 floats, else the largest
    # power of two that keeps rows x positions x vocab_size under it): the same loss, a
    # fraction of the memory of a batch of logits.
    config.logits_chunk = 0

    # Start from a Hugging Face decoder directory (Llama, Mistral, Qwen, Gemma, GPT-2 with
    # tokenizer.json; "" = a new model): its config, weights and tokenizer (config.vocab_size
    # and the tokenizer keys do not apply). --generate continues prompts with it directly.
    config.init_from = ""
    config.finetune = "lora"  # with init_from: "full" (every weight) or "lora" (adapters on
    config.lora_rank = 8      # the attention q/k/v/o and MLP kernels; the rest frozen)
    config.lora_alpha = 16.0

    # Training.
    config.batch_size = 32
    config.eval_batch_size = 64
    config.num_train_steps = 1000
    config.schedule = "warmup_cosine"
    config.learning_rate = 2e-3
    config.warmup_steps = 100
    config.b2 = 0.99
    config.eps = 1e-8
    config.grad_clip_norm = 1.0
    config.log_every_steps = 50
    config.eval_every_steps = 250
    config.checkpoint_every_steps = 250

    # Sampling (--generate, and the samples printed after training).
    config.sample_prompts = ("def ",)  # printed after training; () = none
    config.num_generate_tokens = 96
    config.num_samples = 1
    config.temperature = 0.8
    config.top_k = 0      # 0 = off
    config.top_p = 0.95   # 1.0 = off
    config.sample_seed = 0

    if variant == "gpt2":  # GPT-2 small sizes (Radford et al. 2019), rotary positions, GQA
        config.model.update(num_layers=12, d_model=768, num_heads=12, d_ff=3072,
                            position="rope", num_kv_heads=4, dtype="bfloat16")
        config.update(vocab_size=32_000, max_len=1024, batch_size=64, num_train_steps=20_000,
                      learning_rate=6e-4, warmup_steps=1000, eval_every_steps=2000,
                      checkpoint_every_steps=2000, log_every_steps=100,
                      tokenizer_max_chars=20_000_000)
    elif variant:
        raise ValueError(f"unknown config variant {variant!r}; expected '' or 'gpt2'")
    return config
