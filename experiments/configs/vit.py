"""Default config of experiments/vit.py: a small ViT on the built-in 8x8 digits.

Tuned to reach >= 97% test accuracy on digits in a few minutes on a 2-core
CPU (see docs/vision.md for measured figures). For another dataset override
the data and model keys, e.g.

    python experiments/vit.py --workdir=/tmp/vit_cifar --config.dataset=cifar10 \
        --config.data_dir=~/tensorflow_datasets --config.model.patch_size=4 \
        --config.model.d_model=192 --config.model.num_heads=3 --config.model.num_layers=9 \
        --config.model.d_ff=768 --config.num_epochs=100 --config.batch_size=256
"""
import ml_collections
from ml_collections import config_dict

from tfx_jax import train as tr
from tfx_jax.model_config import model_section
from tfx_jax.vit import ViTConfig


def get_config() -> ml_collections.ConfigDict:
    config = tr.default_config()

    # Data: "digits" (built in, offline) or a TFDS image dataset prepared in ArrayRecord format.
    config.dataset = "digits"
    config.data_dir = config_dict.placeholder(str)  # TFDS data_dir (None: TFDS's default)
    config.train_split = "train"
    config.eval_split = "test"
    config.image_size = config_dict.placeholder(int)  # resize to this side (None: keep)
    config.augment = True  # random shifts (+ flips where the dataset allows them)
    config.max_shift = config_dict.placeholder(int)  # shift range in pixels (None: side // 8)

    # Model: every ViTConfig field (tfx_jax/vit.py); image size, channels and classes come
    # from the data.
    config.model = model_section(ViTConfig, dict(
        patch_size=2, d_model=64, num_heads=4, num_layers=4, d_ff=128,
        dropout_rate=0.0, pool="cls", dtype="float32"),
        derived=("image_size", "num_channels", "num_classes"))

    # Fine-tuning from released weights (docs/pretrained.md): a ViT .npz checkpoint
    # (google-research/vision_transformer, big_vision) or a Hugging Face ViT directory.
    # The checkpoint fixes the architecture (config.model keeps only dropout, dtype, scan,
    # ...), a new zero head is attached, and image_size defaults to the checkpoint's.
    config.init_from = config_dict.placeholder(str)
    config.finetune = "full"  # "full", "frozen" (train the new head only) or "lora"
    config.lora_rank = 8
    config.lora_alpha = 16.0

    # Training: AdamW, linear warm-up then cosine decay (optax, via the train library).
    config.num_epochs = 120  # > 0: sets num_train_steps from the train split's size
    config.batch_size = 64
    config.optimizer = "adamw"
    config.learning_rate = 2e-3
    config.weight_decay = 0.2
    config.b2 = 0.999
    config.eps = 1e-8
    config.warmup_steps = 100
    config.grad_clip_norm = 1.0
    config.label_smoothing = 0.1
    config.eval_every_epochs = 1  # evaluation (test accuracy) every N epochs
    config.checkpoint_every_steps = 500
    config.log_every_steps = 50

    # Filled from the dataset when training starts (kept in <workdir>/config.json).
    config.image_shape = config_dict.placeholder(tuple)
    config.num_classes = config_dict.placeholder(int)
    config.class_names = config_dict.placeholder(tuple)
    return config
