"""Where a Vision Transformer looks: [CLS]-to-patch attention, per layer and head.

ViT classifies from the [CLS] token, which gathers information from the
patches through attention. Row 0 of each layer's attention matrix (the [CLS]
query against every key) says how much each patch contributed in that layer
and head; drawn over the image on the patch grid it shows which parts of the
image the model reads (Dosovitskiy et al. 2021, fig. 6, use attention rollout
over layers; we show the raw per-layer, per-head maps). A model pooled by
average ("gap") has no [CLS] token; for it the map is the attention each patch
receives, averaged over all patch queries.

:class:`tfx_jax.MultiHeadAttention` applied with ``mutable=["intermediates"]``
records the probabilities its output was computed from (the forward pass runs
the dense attention path to have them); :func:`stack_attention_weights` gathers
them from a stack of layers, :func:`cls_attention_maps` draws on them.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional

import jax
import numpy as np

from tfx_jax.apps.figures import save_png
from tfx_jax.vit import ViT


def stack_attention_weights(intermediates: Mapping, attention: str = "self_attention"
                            ) -> np.ndarray:
    """float32 [B, layers, heads, T, S]: what each layer of a :class:`BlockStack` recorded.

    ``intermediates`` is the stack's entry of the ``"intermediates"`` collection
    (e.g. ``state["intermediates"]["encoder"]`` of a ViT applied with
    ``mutable=["intermediates"]``), in either layout: ``layers`` (``scan_layers``:
    one array with a leading layer axis) or ``layer_<i>`` (a layer loop).
    ``attention``: "self_attention" or, in a decoder, "cross_attention".
    """
    if "layers" in intermediates:
        (weights,) = intermediates["layers"][attention]["attention_weights"]
        return np.moveaxis(np.asarray(weights, np.float32), 0, 1)
    count = sum(name.startswith("layer_") for name in intermediates)
    return np.stack([np.asarray(intermediates[f"layer_{i}"][attention]["attention_weights"][0],
                                np.float32) for i in range(count)], axis=1)


def cls_attention_maps(model: ViT, params: Any, images: np.ndarray) -> np.ndarray:
    """float32 [B, layers, heads, grid, grid]: attention from [CLS] to each patch.

    ``images`` are normalised model inputs [B, H, W, C]. One forward pass (dense
    attention) gives the maps. Each map sums to at most 1 (the rest of the [CLS]
    query's attention goes to [CLS] itself).
    """
    cfg = model.config
    _, state = jax.jit(lambda p, x: model.apply({"params": p}, x, mutable=["intermediates"]))(
        params, np.asarray(images, np.float32))
    weights = stack_attention_weights(state["intermediates"]["encoder"])  # [B, L, N, T, T]
    maps = weights[:, :, :, 0, 1:] if cfg.pool == "cls" else weights.mean(axis=3)
    grid = cfg.image_size // cfg.patch_size
    return maps.reshape(*maps.shape[:3], grid, grid)


def plot_attention_maps(image: np.ndarray, maps: np.ndarray, *,
                        title: Optional[str] = None, cmap: str = "inferno"):
    """A matplotlib Figure with one panel per (layer, head): the map over the image.

    Args:
      image: uint8 [H, W, C] (C = 1 or 3), the input as a person sees it.
      maps: [layers, heads, grid, grid] from :func:`cls_attention_maps`.
      title: figure title (e.g. the file and the predicted label).

    Rows are layers (first at the top), columns heads; each panel shows the
    attention (colour, normalised per panel) with the image's outline (cyan
    contour at half brightness). One extra panel, top left, shows the input:
    ``layers * heads + 1`` panels in all.
    """
    from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel

    image = np.asarray(image)
    maps = np.asarray(maps)
    if maps.ndim != 4:
        raise ValueError(f"maps must be [layers, heads, grid, grid], got shape {maps.shape}")
    if image.ndim != 3 or image.dtype != np.uint8 or image.shape[-1] not in (1, 3):
        raise ValueError(f"image must be uint8 [H, W, 1 or 3], got {image.dtype} {image.shape}")
    num_layers, num_heads = maps.shape[:2]
    height, width = image.shape[:2]
    figure = Figure(figsize=(1.6 * (num_heads + 1) + 0.4, 1.6 * num_layers + 0.6),
                    layout="constrained")
    axes = figure.subplots(num_layers, num_heads + 1, squeeze=False)
    grey = image[..., 0] if image.shape[-1] == 1 else image.mean(-1)
    extent = (-0.5, width - 0.5, height - 0.5, -0.5)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0, 0].imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap="gray",
                      vmin=0, vmax=255, interpolation="nearest")
    axes[0, 0].set_title("input", fontsize=9)
    for layer in range(num_layers):
        if layer:
            axes[layer, 0].remove()
        for head in range(num_heads):
            ax = axes[layer, head + 1]
            ax.imshow(maps[layer, head], cmap=cmap, extent=extent, interpolation="nearest",
                      vmin=0.0, vmax=max(float(maps[layer, head].max()), 1e-9))
            ax.contour(grey, levels=[float(grey.min() + grey.max()) / 2], colors="cyan",
                       linewidths=1.0, origin="upper", extent=extent)
            if layer == 0:
                ax.set_title(f"head {head}", fontsize=9)
            if head == 0:
                ax.set_ylabel(f"layer {layer}", fontsize=9)
    if title:
        figure.suptitle(title, fontsize=10)
    return figure


def save_attention_maps(path: str, image: np.ndarray, maps: np.ndarray, *,
                        title: Optional[str] = None, dpi: int = 100) -> int:
    """Writes :func:`plot_attention_maps` as a PNG (``path`` may be a gs:// URL; its
    directory is created); returns the number of panels (``layers * heads + 1``:
    the input and one map per layer and head)."""
    figure = plot_attention_maps(image, maps, title=title)
    save_png(figure, path, dpi=dpi)
    return len(figure.axes)

