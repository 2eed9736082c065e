"""Splash attention: the Pallas TPU flash-attention kernel shipped with jax.

"Splash" (sparse flash) attention is the kernel in
``jax.experimental.pallas.ops.tpu.splash_attention``: FlashAttention's online
softmax (Dao et al. 2022) tiled for the TPU's matrix unit, where the mask is
not an array but an object (``CausalMask``, ``LocalMask``, ``FullMask``, one
per head in a ``MultiHeadMask``) from which the kernel precomputes, per tile,
whether it is empty (skipped), full (no masking work) or partial. Packed
sequences come as ``SegmentIds`` (a query sees only keys with its id), and
grouped-query attention is native: query head n reads key/value head
``n // (num_heads / num_kv_heads)``, as everywhere in tfx_jax.

What this wrapper adds: ``jax.shard_map`` over the mesh in context (XLA cannot
partition a Mosaic kernel: batch over the data-parallel axes, heads over
``tensor``), tiles that fit the chip's VMEM (:func:`choose_blocks`), the
[B, T, N, H] layout (the kernel takes one example, [heads, length, head_dim],
so it is vmapped over the batch), ``scale`` (the
kernel does not scale, so the query is multiplied first), padding as lengths
(turned into segment ids), and the zero-row contract (padding queries return
zeros). It refuses what the kernel cannot do safely: a mask array, a bias,
dropout, and padding that could leave a real query with no key at all (the
kernel's softmax is undefined there), i.e. segment ids or lengths that differ
between queries and keys.

On a CPU it runs only inside ``pltpu.force_tpu_interpret_mode()`` (for tests:
correct and slow).
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from tfx_jax.attention import placement, record_kernel_flops

# The kernel's tiles are multiples of the TPU lane width (128); 512 is the
# larger tile the kernel's own benchmarks use, clipped to the sequence length.
LANES = 128
DEFAULT_BLOCK = 512


def _interpret_mode_forced() -> bool:
    try:
        from jax._src import config
        return config.pallas_tpu_interpret_mode_context_manager.value is not None
    except (ImportError, AttributeError):  # moved: let the kernel say what is wrong
        return True


def splash_unsupported_reason(query_shape, key_shape, *, has_mask: bool, has_bias: bool,
                              dropout_rate: float, has_padding: bool, padding_shared: bool,
                              local_window, platform: Optional[str] = None,
                              value_head_dim: Optional[int] = None, causal: bool = False,
                              has_segment_ids: bool = False) -> Optional[str]:
    """None if splash can run these inputs, else a sentence saying why not.

    ``has_padding``: segment ids or lengths are given; ``padding_shared``: the
    keys get the very same ones as the queries (self-attention padding).
    Lengths that are not multiples of the tile are padded (:func:`splash_attention`).
    """
    t, h = query_shape[1], query_shape[3]
    s = key_shape[1]
    if has_mask:
        return ("splash takes masks only as causal=True, local_window, segment ids or "
                "lengths (mask objects, never a T x S array); use implementation='chunked'")
    if has_bias:
        return "splash takes no additive bias; use implementation='dense'"
    if dropout_rate > 0.0:
        return "splash has no attention dropout; use implementation='chunked'"
    if value_head_dim is not None and value_head_dim != h:
        return f"splash needs value head_dim == query head_dim ({h}), got {value_head_dim}"
    if has_padding and not padding_shared and (
            local_window is not None or (causal and has_segment_ids)):
        return ("splash takes a local window, or causal segment ids, only with padding that "
                "queries and keys share (self-attention): otherwise a real query may see no "
                "key inside its window; use implementation='chunked'")
    if local_window is not None and t != s:
        return (f"splash with a local window needs q_length == kv_length, got {t} and {s}")
    if platform is None:
        platform = placement().platform
        if platform != "tpu" and _interpret_mode_forced():
            return None
    if platform != "tpu":
        return (f"splash is a TPU kernel, but the platform is {platform!r} (on a CPU it "
                f"runs only under jax.experimental.pallas.tpu.force_tpu_interpret_mode())")
    return None


def _head_mask(t: int, s: int, causal: bool, local_window):
    from jax.experimental.pallas.ops.tpu.splash_attention import (CausalMask, FullMask,
                                                                  LocalMask)
    left, right = (None, None) if local_window is None else local_window
    if causal:
        right = 0 if right is None else min(right, 0)
    if left is None and right is None:
        return FullMask((t, s))
    if left is None and right == 0:
        return CausalMask((t, s))
    return LocalMask((t, s), window_size=(left, right), offset=0)


def _kernel(t: int, s: int, num_heads: int, causal: bool, local_window, block_q: int,
            block_kv: int, logit_soft_cap: Optional[float] = None):
    """The kernel for one example, built in the trace that calls it: it holds its mask
    tables as arrays of that trace (a kernel cached across traces leaked them as
    tracers into the next caller). jax caches the mask processing itself."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa
    mask = sa.MultiHeadMask([_head_mask(t, s, causal, local_window)] * num_heads)
    blocks = sa.BlockSizes(block_q=block_q, block_kv=block_kv, block_kv_compute=block_kv,
                           block_q_dkv=block_q, block_kv_dkv=block_kv,
                           block_kv_dkv_compute=block_kv, block_q_dq=block_q,
                           block_kv_dq=block_kv)
    return sa.make_splash_mha_single_device(mask, block_sizes=blocks,
                                            attn_logits_soft_cap=logit_soft_cap)


def _block(length: int, block: int) -> int:
    """The largest multiple of LANES <= block that divides length."""
    block = max(LANES, min(block - block % LANES, length))
    while length % block:
        block -= LANES
    return block


# The VMEM a kernel may use (the TPU compiler's scoped-VMEM limit, below the
# physical 16-128 MiB), in units of `block_vmem_bytes`' estimate: measured with the
# real compiler (libtpu 0.0.42, splash forward + backward at T 4096-8192, head 128
# and 256). v4: 9 MiB compiles, 15 does not; v5e: 22 compiles, 26 does not. Chips
# not measured take v5e's budget (their VMEM is no smaller). First match of a
# lower-cased substring of the device kind wins.
VMEM_BUDGETS = (("v4", 12 << 20), ("v5 lite", 24 << 20), ("v5e", 24 << 20))
DEFAULT_VMEM_BUDGET = 24 << 20


def vmem_budget(device_kind: str) -> int:
    """The VMEM budget of a splash kernel on this TPU kind (see ``VMEM_BUDGETS``)."""
    kind = device_kind.lower()
    for pattern, size in VMEM_BUDGETS:
        if pattern in kind:
            return size
    return DEFAULT_VMEM_BUDGET


def block_vmem_bytes(block_q: int, block_kv: int, head_dim: int, itemsize: int) -> int:
    """Estimated VMEM the kernel's largest pass (the dK/dV backward) needs at these tiles.

    Double-buffered query, key, value, output and gradient tiles in the input
    dtype, float32 accumulators for the output / dK / dV, and one float32
    ``block_q x block_kv`` score tile (within 10% of the compiler's figure at
    T = 8192, head 256, blocks 8192: 340 estimated, 320 MiB used).
    """
    tiles = 2 * itemsize * head_dim * (3 * block_q + 4 * block_kv)
    accumulators = 4 * head_dim * (block_q + 2 * block_kv)
    scores = 4 * block_q * block_kv
    return tiles + accumulators + scores


def choose_blocks(t: int, s: int, head_dim: int, itemsize: int, device_kind: str, *,
                  block_q: Optional[int] = None, block_kv: Optional[int] = None
                  ) -> tuple[int, int]:
    """The splash tiles for this chip and head size: the largest multiples of 128
    that divide the lengths, at most ``DEFAULT_BLOCK`` and within the chip's VMEM
    budget; tiles a user gives are checked against that budget (ValueError)."""
    budget = vmem_budget(device_kind) if device_kind.lower().startswith("tpu") else None
    if block_q is not None or block_kv is not None:
        bq, bkv = _block(t, block_q or DEFAULT_BLOCK), _block(s, block_kv or DEFAULT_BLOCK)
        need = block_vmem_bytes(bq, bkv, head_dim, itemsize)
        if budget is not None and need > budget:
            raise ValueError(
                f"splash blocks block_q={bq}, block_kv={bkv} at head_dim {head_dim} need about "
                f"{need / 2**20:.1f} MiB of VMEM, over the {budget / 2**20:.0f} MiB a kernel "
                f"gets on a {device_kind}; use smaller blocks (multiples of {LANES})")
        return bq, bkv
    bq, bkv = _block(t, DEFAULT_BLOCK), _block(s, DEFAULT_BLOCK)
    while budget is not None and block_vmem_bytes(bq, bkv, head_dim, itemsize) > budget and (
            bq > LANES or bkv > LANES):
        if bq >= bkv and bq > LANES:
            bq = _block(t, bq - LANES)
        else:
            bkv = _block(s, bkv - LANES)
    return bq, bkv


def _free_axes(mesh) -> list:
    """The mesh's axes of size > 1 that are not already manual (inside a shard_map)."""
    manual = set(mesh.manual_axes)
    return [a for a, size in zip(mesh.axis_names, mesh.axis_sizes)
            if a not in manual and size > 1]


def computed_tiles(t: int, s: int, block_q: int, block_kv: int, causal: bool,
                   local_window) -> int:
    """How many ``block_q x block_kv`` tiles of the T x S scores the kernel computes
    (the others are empty under the causal / window mask and skipped)."""
    left, right = (None, None) if local_window is None else local_window
    if causal:
        right = 0 if right is None else min(right, 0)
    tiles = 0
    for first in range(0, t, block_q):
        lo = 0 if left is None else max(0, first - left)
        hi = s - 1 if right is None else min(s - 1, first + block_q - 1 + right)
        if hi >= lo:
            tiles += hi // block_kv - lo // block_kv + 1
    return tiles


def _shard_axes(mesh, batch: int, num_heads: int, num_kv_heads: int):
    """Mesh axes the kernel's calls split: (batch axes, heads axis or None).

    Heads go over ``tensor`` when it divides both head counts; the batch over the
    other free (not already manual) axes, in mesh order, while their product
    divides it. Axes left out hold the whole batch / all heads (replicated work).
    """
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
    free = _free_axes(mesh)
    heads = None
    if "tensor" in free and num_heads % sizes["tensor"] == 0 and (
            num_kv_heads % sizes["tensor"] == 0):
        heads = "tensor"
    batch_axes, ways = [], 1
    for axis in free:
        if axis != "tensor" and batch % (ways * sizes[axis]) == 0:
            batch_axes.append(axis)
            ways *= sizes[axis]
    return tuple(batch_axes), heads


def padded_length(length: int) -> int:
    """``length`` rounded up to the kernel's tile width."""
    return -(-length // LANES) * LANES


def _segment_ids(b: int, t: int, s: int, q_segment_ids, kv_segment_ids, q_lengths, kv_lengths):
    """Padding of every kind as the kernel's segment ids (0 = padding), queries' and keys';
    the keys' are the queries' very array when both sides share them (self-attention).
    (None, None) when there is no padding and no tile padding."""
    if all(x is None for x in (q_segment_ids, kv_segment_ids, q_lengths, kv_lengths)):
        if t % LANES == 0 and s % LANES == 0:
            return None, None
        ones = jnp.ones((b, t), jnp.int32)
        return (ones, ones) if t == s else (ones, jnp.ones((b, s), jnp.int32))

    def ids(segment_ids, lengths, length):
        out = (jnp.ones((b, length), jnp.int32) if segment_ids is None
               else jnp.asarray(segment_ids, jnp.int32))
        if lengths is not None:
            out = jnp.where(jnp.arange(length)[None, :] < lengths[:, None], out, 0)
        return out

    q_ids = ids(q_segment_ids, q_lengths, t)
    shared = t == s and kv_segment_ids is q_segment_ids and kv_lengths is q_lengths
    return q_ids, q_ids if shared else ids(kv_segment_ids, kv_lengths, s)


def _has_key(q_ids: jax.Array, kv_ids: jax.Array) -> jax.Array:
    """[B, T]: query i is real (id != 0) and some real key has its segment id."""
    padding = jnp.iinfo(jnp.int32).min  # sorts first, matches no real id
    keys = jnp.sort(jnp.where(kv_ids == 0, padding, kv_ids), axis=-1)
    where = jax.vmap(jnp.searchsorted)(keys, q_ids)
    found = jnp.take_along_axis(keys, jnp.minimum(where, keys.shape[-1] - 1), axis=-1)
    return (found == q_ids) & (q_ids != 0)


def splash_attention(query: jax.Array, key: jax.Array, value: jax.Array, *,
                     causal: bool = False, local_window=None, scale: Optional[float] = None,
                     q_segment_ids: Optional[jax.Array] = None,
                     kv_segment_ids: Optional[jax.Array] = None,
                     q_lengths: Optional[jax.Array] = None,
                     kv_lengths: Optional[jax.Array] = None,
                     block_q: Optional[int] = None, block_kv: Optional[int] = None,
                     logit_soft_cap: Optional[float] = None) -> jax.Array:
    """Splash attention on [B, T, N, H] query and [B, S, K, H] key/value; returns [B, T, N, H].

    Inputs are assumed validated by ``tfx_jax.dot_product_attention`` /
    `splash_unsupported_reason`. Padding (segment ids, 0 = padding, and/or
    lengths, for queries and keys) becomes the kernel's ``SegmentIds``; lengths
    that are not multiples of the 128-wide tile are padded to it with id 0 and
    the result cut back. Queries with no key to attend return zeros.
    ``block_q`` / ``block_kv``: the kernel's tiles (default: :func:`choose_blocks`
    for the chip and head size). ``logit_soft_cap`` c: the kernel's
    ``attn_logits_soft_cap``, the scaled scores become c * tanh(scores / c) (Gemma 2).

    A Mosaic kernel cannot be partitioned by XLA, so on a mesh (``jax.set_mesh``,
    or the training library's steps) the calls run under ``jax.shard_map``:
    batch over the data-parallel axes, heads over ``tensor`` (:func:`_shard_axes`);
    each device runs the kernel on its own examples and heads.
    """
    from jax.experimental.pallas.ops.tpu.splash_attention import SegmentIds

    placed = placement()
    b, t0, n, h = query.shape
    s0 = key.shape[1]
    scale = h ** -0.5 if scale is None else scale
    q_ids, kv_ids = _segment_ids(b, t0, s0, q_segment_ids, kv_segment_ids, q_lengths,
                                 kv_lengths)
    t, s = padded_length(t0), padded_length(s0)
    if (t, s) != (t0, s0):  # to the tile: padded queries and keys get segment id 0
        query = jnp.pad(query, ((0, 0), (0, t - t0), (0, 0), (0, 0)))
        key, value = (jnp.pad(x, ((0, 0), (0, s - s0), (0, 0), (0, 0))) for x in (key, value))
        shared = kv_ids is q_ids
        q_ids = jnp.pad(q_ids, ((0, 0), (0, t - t0)))
        kv_ids = q_ids if shared else jnp.pad(kv_ids, ((0, 0), (0, s - s0)))
    bq, bkv = choose_blocks(t, s, h, jnp.dtype(query.dtype).itemsize, placed.device_kind,
                            block_q=block_q, block_kv=block_kv)
    record_kernel_flops(4 * b * n * h * bq * bkv * computed_tiles(t, s, bq, bkv, causal,
                                                                   local_window))
    q = (query * jnp.asarray(scale, query.dtype)).transpose(0, 2, 1, 3)  # [B, N, T, H]
    k, v = key.transpose(0, 2, 1, 3), value.transpose(0, 2, 1, 3)        # [B, K, S, H]
    # Over the batch: vmap (a grid axis on the TPU). jax's TPU interpret mode cannot
    # batch a kernel's grid (its dimension semantics keep their length), so under
    # interpret mode on a CPU the examples go one after another instead.
    over_batch = jax.vmap
    if placed.platform != "tpu":
        over_batch = lambda f: lambda *xs: jax.lax.map(lambda x: f(*x), xs)  # noqa: E731

    def attend(q, k, v, *ids):
        kernel = _kernel(t, s, q.shape[1], bool(causal), local_window, bq, bkv,
                         None if logit_soft_cap is None else float(logit_soft_cap))
        segments = [SegmentIds(q=ids[0], kv=ids[1])] if ids else []
        return over_batch(kernel)(q, k, v, *segments)

    args = (q, k, v) if q_ids is None else (q, k, v, q_ids, kv_ids)
    mesh = placed.mesh
    if mesh is not None and _free_axes(mesh):
        batch_axes, heads = _shard_axes(mesh, b, n, k.shape[1])
        P = jax.sharding.PartitionSpec
        spec = P(batch_axes or None, heads, None, None)
        attend = jax.shard_map(attend, mesh=mesh, out_specs=spec, check_vma=False,
                               axis_names=frozenset(mesh.axis_names) - set(mesh.manual_axes),
                               in_specs=(spec,) * 3 + ((P(batch_axes or None, None),) * 2
                                                       if q_ids is not None else ()))
    out = attend(*args)
    if q_ids is not None:
        # Queries with no key (padding, or a segment id the keys lack) got the kernel's
        # uniform average over masked keys: our contract is zeros.
        attends = (q_ids != 0) if kv_ids is q_ids else _has_key(q_ids, kv_ids)
        out = jnp.where(attends[:, None, :, None], out, jnp.zeros((), out.dtype))
    return out[:, :, :t0].transpose(0, 2, 1, 3).astype(value.dtype)
