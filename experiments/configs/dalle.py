"""Default config of experiments/dalle.py: a small DALL-E-style generator of 8x8 digits.

The LM models [BOS, prompt words, PAD..., BOI, image tokens] (72 tokens with
8 grey levels per pixel). Generation evaluation needs a trained ViT digit
classifier: train one with experiments/vit.py and pass its workdir as
--config.classifier_workdir. See docs/vision.md for measured figures.
"""
import ml_collections
from ml_collections import config_dict

from tfx_jax import train as tr
from tfx_jax.lm import CausalLMConfig
from tfx_jax.model_config import model_section


def get_config() -> ml_collections.ConfigDict:
    config = tr.default_config()

    # Data and tokens.
    config.dataset = "digits"  # a grey 8x8 dataset; other TFDS names need matching tokenizers
    config.data_dir = config_dict.placeholder(str)
    config.train_split = "train"
    config.eval_split = "test"
    config.image_tokenizer = "gray_levels"  # or "patch_vq" (k-means codebook of 2x2 patches)
    config.num_gray_levels = 8
    config.codebook_size = 64
    config.vq_patch_size = 2
    config.text_loss_weight = 1 / 8  # DALL-E: text 1/8, image 7/8 of the loss

    # Model: every CausalLMConfig field (tfx_jax/lm.py); vocabulary and context length
    # come from the tokens.
    config.model = model_section(CausalLMConfig, dict(
        num_layers=4, d_model=64, num_heads=4, d_ff=256, dropout_rate=0.1,
        position="learned", tie_embeddings=True, dtype="float32"),
        derived=("vocab_size", "max_len"))

    # Training (teacher forcing), AdamW with warm-up and cosine decay.
    config.num_train_steps = 2000
    config.batch_size = 64
    config.optimizer = "adamw"
    config.learning_rate = 1e-3
    config.weight_decay = 0.01
    config.b2 = 0.99
    config.eps = 1e-8
    config.warmup_steps = 200
    config.grad_clip_norm = 1.0
    config.log_every_steps = 100
    config.eval_every_steps = 1000
    config.checkpoint_every_steps = 500

    # Sampling (generation and evaluation).
    config.samples_per_prompt = 20
    config.temperature = 1.0
    config.top_k = 0  # 0 = no top-k cut
    config.sample_seed = 0
    # A trained ViT digit classifier's workdir: scores generated images at each evaluation.
    config.classifier_workdir = config_dict.placeholder(str)

    # Filled from the dataset when training starts (kept in <workdir>/config.json).
    config.image_shape = config_dict.placeholder(tuple)
    return config
