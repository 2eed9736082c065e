"""Context parallelism: one sequence split over devices, attention exact across them.

Chunked attention (``attention_chunked.py``) removed the ``T x S`` score matrix
from one device's memory, but every device still holds the whole sequence's
activations. Splitting the *length* over a mesh axis (``context``) divides
them by its size P. Only attention mixes positions, so only attention needs
communication; two strategies:

``"ring"`` (Ring Attention, Liu et al. 2023): each device
keeps its block of queries, and the key/value blocks travel around the ring of
P devices with ``lax.ppermute``; at each of the P steps a device attends its
queries to the block it holds, continuing the chunked kernel's online softmax
(running max, normaliser, unnormalised output), so after the last step it
holds the exact output. No device ever holds more than two key/value blocks
(the one it uses, the one arriving) nor more than one tile of scores. The
backward pass (a ``jax.custom_vjp``) rings again: dQ accumulates where its
queries live, while dK and dV travel with their key/value block and arrive
home after P hops. In the forward pass a block's transfer does not depend on the
compute with it, so the compiler may overlap the two (not measured here: the CPU's
simulated devices share their cores).

``"all_gather"`` gathers K and V over the axis (``lax.all_gather``), attends the
local queries to all of them, and in the backward pass reduce-scatters dK and
dV (``lax.psum_scatter``). Simpler and fewer, larger messages; but every
device holds all keys and values (not the scores: the local attention is
chunked), which is fine while K/V are small next to the rest of the activations
(grouped-query attention with few key/value heads).

Skipped work. Causal masks and local windows are bands on the *absolute*
positions, so each device's kernel call is told where its query and key blocks
start; tiles wholly outside the band are skipped by the chunked kernel's loop
bounds. With a causal mask the naive split is unbalanced (the device with the
first positions skips almost everything, the last does P blocks of work), so
by default (``load_balance=True``) the sequence is cut into 2P chunks and
device d holds chunks d and 2P-1-d ("zig-zag"; Brandon et al. 2023 stripe
tokens instead): every device then attends the same number of pairs. The
reorder is two ``ppermute``s in and out of each call, undone before the output.

Layout: global ``[B, T, N, H]`` arrays whose length is sharded over
``axis_name`` (and, where the mesh has them, batch over ``data`` x ``fsdp`` and
heads over ``tensor``, as the training library's rules shard activations).
Grouped-query attention passes K/V with their own (fewer) heads, never repeated.
"""
from __future__ import annotations

import functools
import math
import numbers
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec

from tfx_jax import attention as _attention
from tfx_jax.attention_chunked import (DEFAULT_BLOCK_KV, DEFAULT_BLOCK_Q, _Blocking, _Extras,
                                       _ids_to_blocks, _kv_block_range, _kv_from_blocks,
                                       _kv_to_blocks, _q_from_blocks, _q_to_blocks,
                                       _window_bounds, backward_blocks, empty_state, finish,
                                       forward_blocks, softmax_delta)
from tfx_jax.errors import ConfigError

STRATEGIES = ("ring", "all_gather")
CONTEXT_AXIS = "context"
# The mesh axes the training library (tfx_jax.train.mesh) splits the batch and the
# heads over; axes a mesh lacks are ignored.
BATCH_AXES = ("data", "fsdp")
HEADS_AXIS = "tensor"


class _Plan(NamedTuple):
    """Static description of one call (hashable: a custom_vjp nondiff argument)."""
    mesh: Any
    axis_name: str
    size: int              # P, devices on the context axis
    strategy: str
    runs: int              # contiguous runs of positions per device: 2 zig-zagged, else 1
    q_run: int             # positions per run
    kv_run: int
    blocking: _Blocking    # of one (query run, key/value run) pair; all_gather: all keys
    batch_axes: Optional[tuple]
    heads_axis: Optional[str]


def _axis_sizes(mesh) -> dict:
    return dict(zip(mesh.axis_names, mesh.axis_sizes))


def context_size(mesh, axis_name: str = CONTEXT_AXIS) -> int:
    """Devices on ``axis_name`` of ``mesh`` (1 when the mesh lacks it or is None)."""
    if mesh is None:
        return 1
    return int(_axis_sizes(mesh).get(axis_name, 1))


# --- the zig-zag reorder (inside shard_map, on [B, L, ...] local arrays) ------------------------
#
# With load balancing a device's positions are two runs: chunks d and 2P-1-d of 2P. Its
# natural half k (chunk 2d + k) goes to the device that holds that chunk, by one ppermute
# per k; each is a permutation of the devices. Device d keeps the runs in the order they
# arrive, so run k holds chunk d when k + d is even and chunk 2P-1-d otherwise (see
# _chunk_of): only the positions depend on the device, no data is selected or copied.

def _zigzag_perms(size: int):
    """The ppermute pairs (e, holder of chunk 2e + k) for k = 0, 1."""
    def holder(c):
        return c if c < size else 2 * size - 1 - c
    return tuple(tuple((e, holder(2 * e + k)) for e in range(size)) for k in (0, 1))


def _chunk_of(plan: _Plan, device, k):
    """Which of the sequence's chunks (of ``runs * P``) run k of ``device`` holds."""
    if plan.runs == 1:
        return device
    mirrored = 2 * plan.size - 1 - device
    if isinstance(device, int):
        return device if (device + k) % 2 == 0 else mirrored
    return jnp.where((device + k) % 2 == 0, device, mirrored)


def _run_starts(plan: _Plan, device, run: int):
    """Absolute position of the first token of each of ``device``'s runs."""
    return tuple(_chunk_of(plan, device, k) * run for k in range(plan.runs))


def _to_runs(plan: _Plan, x):
    """A device's natural [B, L, ...] block -> its runs (zig-zagged when balanced)."""
    if x is None or plan.runs == 1:
        return (x,) * plan.runs
    h = x.shape[1] // 2
    return tuple(lax.ppermute(half, plan.axis_name, perm)
                 for half, perm in zip((x[:, :h], x[:, h:]), _zigzag_perms(plan.size)))


def _from_runs(plan: _Plan, runs):
    """The inverse of _to_runs: the device's natural [B, L, ...] block."""
    if plan.runs == 1:
        return runs[0]
    return jnp.concatenate([lax.ppermute(run, plan.axis_name, tuple((d, e) for e, d in perm))
                            for run, perm in zip(runs, _zigzag_perms(plan.size))], axis=1)


def _gather_order(plan: _Plan):
    """For each chunk of the sequence in order, the (run, device) holding it."""
    where = {_chunk_of(plan, d, k): (k, d) for k in range(plan.runs) for d in range(plan.size)}
    return [where[c] for c in range(plan.runs * plan.size)]


def _all_gather(plan: _Plan, runs):
    """all_gather: every device's runs -> the whole sequence [B, S, ...] in order."""
    if runs[0] is None:
        return None
    run = runs[0].shape[1]
    gathered = [lax.all_gather(r, plan.axis_name, axis=1, tiled=True) for r in runs]
    return jnp.concatenate([gathered[k][:, d * run:(d + 1) * run]
                            for k, d in _gather_order(plan)], axis=1)


def _reduce_scatter(plan: _Plan, x, run: int):
    """The transpose of _all_gather: sums [B, S, ...] over the devices, each keeping its runs."""
    def chunk(c):
        return x[:, c * run:(c + 1) * run]
    return tuple(
        lax.psum_scatter(jnp.concatenate([chunk(_chunk_of(plan, d, k)) for d in range(plan.size)],
                                         axis=1),
                         plan.axis_name, scatter_dimension=1, tiled=True)
        for k in range(plan.runs))


# --- per-device pieces ---------------------------------------------------------------------------

def _pair_extras(q_ids, kv_ids, q_start, kv_start) -> _Extras:
    return _Extras(mask=None, q_lengths=None, kv_lengths=None, q_segments=q_ids,
                   kv_segments=kv_ids, dropout_seeds=None, q_offset=q_start,
                   kv_offset=kv_start)


def _kv_blocks(plan: _Plan, k_runs, v_runs, id_runs):
    """The key/value blocks a device starts from: its own runs (ring) or all (all_gather)."""
    if plan.strategy == "all_gather":
        k_runs, v_runs, id_runs = ((_all_gather(plan, r),) for r in (k_runs, v_runs, id_runs))
    bk = plan.blocking.block_kv
    return (tuple(_kv_to_blocks(r, bk) for r in k_runs),
            tuple(_kv_to_blocks(r, bk) for r in v_runs),
            tuple(_ids_to_blocks(r, bk) for r in id_runs))


def _visit(plan: _Plan, compute, carry, moving, device):
    """Calls ``compute(carry, moving, kv_starts) -> (carry, moving)`` once per key/value
    block: ring: for the block from each device in turn, passing ``moving`` on to the
    next device after each call (the P-th pass brings every block home: the
    backward needs that for dK/dV; the forward's last pass is one transfer in P
    that a peeled last step would save at twice the compiled code);
    all_gather: once, for the gathered keys starting at position 0."""
    if plan.strategy == "all_gather":
        return compute(carry, moving, (0,))
    shift = tuple((i, (i + 1) % plan.size) for i in range(plan.size))

    def step(s, state):
        carry, moving = compute(*state, _run_starts(plan, (device - s) % plan.size,
                                                    plan.kv_run))
        return carry, lax.ppermute(moving, plan.axis_name, shift)

    return lax.fori_loop(0, plan.size, step, (carry, moving))


def _local_forward(plan: _Plan, q, k, v, q_ids, kv_ids):
    """One device: out [B, L, N, H_v] (natural order) and the backward's residuals."""
    device = lax.axis_index(plan.axis_name)
    runs = tuple(_to_runs(plan, x) for x in (q, k, v, q_ids, kv_ids))
    q_runs, _, _, q_id_runs, _ = runs
    num_kv_heads = k.shape[2]
    q_blocks = tuple(_q_to_blocks(r, plan.blocking.block_q, num_kv_heads) for r in q_runs)
    q_id_blocks = tuple(_ids_to_blocks(r, plan.blocking.block_q) for r in q_id_runs)
    q_starts = _run_starts(plan, device, plan.q_run)

    def compute(states, moving, kv_starts):
        k_blocks, v_blocks, kv_id_blocks = moving
        states = list(states)
        for a, q_a in enumerate(q_blocks):
            for b, kv_start in enumerate(kv_starts):
                extras = _pair_extras(q_id_blocks[a], kv_id_blocks[b], q_starts[a], kv_start)
                states[a] = forward_blocks(plan.blocking, q_a, k_blocks[b], v_blocks[b],
                                           extras, states[a])
        return tuple(states), moving

    states = tuple(empty_state(q_a, v.shape[-1]) for q_a in q_blocks)
    states, _ = _visit(plan, compute, states, _kv_blocks(plan, *runs[1:3], runs[4]), device)
    outs, lses = zip(*(finish(state, v.dtype) for state in states))
    out = _from_runs(plan, [_q_from_blocks(o, plan.q_run) for o in outs])
    return out, (runs, jnp.stack(lses))


def _local_backward(plan: _Plan, runs, lse, out, d_out):
    """One device: (dQ, dK, dV) of its natural blocks."""
    device = lax.axis_index(plan.axis_name)
    q_runs, k_runs, v_runs, q_id_runs, kv_id_runs = runs
    num_kv_heads = k_runs[0].shape[2]
    bq = plan.blocking.block_q
    to_q_blocks = lambda xs: tuple(_q_to_blocks(r, bq, num_kv_heads) for r in xs)
    q_blocks, do_blocks = to_q_blocks(q_runs), to_q_blocks(_to_runs(plan, d_out))
    # rowsum(dO * O), [B, L, N] -> blocks [nq, B, K, G, bq] (a trailing unit head dim).
    deltas = tuple(_q_to_blocks(r[..., None], bq, num_kv_heads)[..., 0] for r in
                   _to_runs(plan, softmax_delta(out, d_out)))
    q_id_blocks = tuple(_ids_to_blocks(r, bq) for r in q_id_runs)
    q_starts = _run_starts(plan, device, plan.q_run)
    k_blocks, v_blocks, kv_id_blocks = _kv_blocks(plan, k_runs, v_runs, kv_id_runs)
    zeros = lambda blocks: tuple(jnp.zeros(x.shape, jnp.float32) for x in blocks)

    def compute(d_q, moving, kv_starts):
        k_blocks, v_blocks, kv_id_blocks, d_k, d_v = moving
        d_q, d_k, d_v = list(d_q), list(d_k), list(d_v)
        for a, q_a in enumerate(q_blocks):
            for b, kv_start in enumerate(kv_starts):
                extras = _pair_extras(q_id_blocks[a], kv_id_blocks[b], q_starts[a], kv_start)
                d_q[a], d_k[b], d_v[b] = backward_blocks(
                    plan.blocking, q_a, k_blocks[b], v_blocks[b], extras, do_blocks[a],
                    lse[a], deltas[a], d_q[a], (d_k[b], d_v[b]))
        return tuple(d_q), (k_blocks, v_blocks, kv_id_blocks, tuple(d_k), tuple(d_v))

    moving = (k_blocks, v_blocks, kv_id_blocks, zeros(k_blocks), zeros(v_blocks))
    d_q, moving = _visit(plan, compute, zeros(q_blocks), moving, device)
    dtypes = (q_runs[0].dtype, k_runs[0].dtype, v_runs[0].dtype)
    d_q = [_q_from_blocks(x, plan.q_run) for x in d_q]
    if plan.strategy == "all_gather":
        d_k, d_v = (_reduce_scatter(plan, _kv_from_blocks(x[0], plan.blocking.kv_length),
                                    plan.kv_run) for x in moving[-2:])
    else:
        d_k, d_v = ([_kv_from_blocks(x, plan.kv_run) for x in xs] for xs in moving[-2:])
    return tuple(_from_runs(plan, x).astype(dtype) for x, dtype in zip((d_q, d_k, d_v), dtypes))


# --- the sharded, differentiable function ---------------------------------------------------------

def _specs(plan: _Plan, has_ids: bool):
    seq = PartitionSpec(plan.batch_axes, plan.axis_name, plan.heads_axis, None)
    ids = PartitionSpec(plan.batch_axes, plan.axis_name) if has_ids else None
    lse = PartitionSpec(None, plan.axis_name, plan.batch_axes, plan.heads_axis, None, None)
    run = lambda spec: (spec,) * plan.runs
    residuals = ((run(seq), run(seq), run(seq), run(ids), run(ids)), lse)
    return seq, ids, residuals


def _shard_map(plan: _Plan, fn, in_specs, out_specs):
    return jax.shard_map(functools.partial(fn, plan), mesh=plan.mesh, in_specs=in_specs,
                         out_specs=out_specs, check_vma=False)


def _sharded_forward(plan, q, k, v, q_ids, kv_ids):
    seq, ids, residuals = _specs(plan, q_ids is not None)
    return _shard_map(plan, _local_forward, (seq, seq, seq, ids, ids), (seq, residuals))(
        q, k, v, q_ids, kv_ids)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _context_parallel(plan, q, k, v, q_ids, kv_ids):
    return _sharded_forward(plan, q, k, v, q_ids, kv_ids)[0]


def _context_parallel_fwd(plan, q, k, v, q_ids, kv_ids):
    out, residuals = _sharded_forward(plan, q, k, v, q_ids, kv_ids)
    return out, (residuals, out, q_ids is not None)


def _context_parallel_bwd(plan, saved, d_out):
    (runs, lse), out, has_ids = saved
    seq, _, residuals = _specs(plan, has_ids)
    d_q, d_k, d_v = _shard_map(plan, _local_backward, residuals + (seq, seq), (seq, seq, seq))(
        runs, lse, out, d_out)
    return d_q, d_k, d_v, None, None


_context_parallel.defvjp(_context_parallel_fwd, _context_parallel_bwd)


# --- the public function --------------------------------------------------------------------------

def _segments_with_lengths(ids, lengths, length, batch):
    """Segment ids with the positions past ``lengths`` set to 0 (padding)."""
    if lengths is None:
        return ids
    lengths = jnp.clip(jnp.asarray(lengths, jnp.int32), 0, length)
    real = jnp.arange(length)[None, :] < lengths[:, None]
    ids = jnp.ones((batch, length), jnp.int32) if ids is None else jnp.asarray(ids, jnp.int32)
    return jnp.where(real, ids, 0)


def _make_plan(query_shape, key_shape, *, mesh, axis_name, strategy, causal, local_window,
               scale, load_balance, block_q, block_kv) -> _Plan:
    if strategy not in STRATEGIES:
        raise ConfigError(f"context parallelism strategy must be one of {STRATEGIES}, "
                          f"got {strategy!r}")
    sizes = _axis_sizes(mesh)
    if axis_name not in sizes:
        raise ConfigError(f"context parallelism over axis {axis_name!r}: the mesh has axes "
                          f"{list(mesh.axis_names)}")
    for name, block in (("block_q", block_q), ("block_kv", block_kv)):
        if not isinstance(block, numbers.Integral) or isinstance(block, bool) or block < 1:
            raise ConfigError(f"{name} must be a positive int, got {block!r}")
    size = sizes[axis_name]
    runs = 2 if load_balance and causal and size > 1 else 1
    b, t, n, h = query_shape
    s, num_kv_heads = key_shape[1], key_shape[2]
    for name, length in (("q_length", t), ("kv_length", s)):
        if length % (runs * size):
            balance = (f" (causal load balancing cuts it into 2 x {size} chunks; "
                       f"load_balance=False needs only {size})" if runs == 2 else "")
            raise ConfigError(
                f"context parallelism over {axis_name!r} ({size} devices): {name}={length} "
                f"is not divisible by {runs * size}{balance}")
    q_run, kv_run = t // (runs * size), s // (runs * size)
    kv_length = s if strategy == "all_gather" else kv_run
    left, right = _window_bounds(causal, local_window)
    blocking = _Blocking(q_length=q_run, kv_length=kv_length, block_q=min(block_q, q_run),
                         block_kv=min(block_kv, kv_length), left=left, right=right,
                         scale=float(1.0 / math.sqrt(h) if scale is None else scale),
                         dropout_rate=0.0)
    batch_axes = tuple(a for a in BATCH_AXES if sizes.get(a, 1) > 1)
    if not batch_axes or b % math.prod(sizes[a] for a in batch_axes):
        batch_axes = None  # replicated: every batch device computes the whole batch
    tensor = sizes.get(HEADS_AXIS, 1)
    heads_axis = HEADS_AXIS if tensor > 1 and n % tensor == 0 and num_kv_heads % tensor == 0 \
        else None
    return _Plan(mesh=mesh, axis_name=axis_name, size=size, strategy=strategy, runs=runs,
                 q_run=q_run, kv_run=kv_run, blocking=blocking, batch_axes=batch_axes,
                 heads_axis=heads_axis)


def context_parallel_attention(query: jax.Array, key: jax.Array, value: jax.Array, *, mesh,
                               axis_name: str = CONTEXT_AXIS, strategy: str = "ring",
                               causal: bool = False,
                               q_segment_ids: Optional[jax.Array] = None,
                               kv_segment_ids: Optional[jax.Array] = None,
                               local_window=None, scale: Optional[float] = None,
                               q_lengths: Optional[jax.Array] = None,
                               kv_lengths: Optional[jax.Array] = None,
                               load_balance: bool = True,
                               block_q: int = DEFAULT_BLOCK_Q,
                               block_kv: int = DEFAULT_BLOCK_KV) -> jax.Array:
    """softmax(scale * Q K^T) V with the sequence split over ``mesh``'s ``axis_name``.

    The same numbers as ``tfx_jax.dot_product_attention`` with the same
    ``causal``, ``q_segment_ids`` / ``kv_segment_ids`` (packed rows; 0 = padding),
    ``local_window``, ``scale`` and ``q_lengths`` / ``kv_lengths`` (folded into
    segment ids): ``query`` [B, T, N, H], ``key`` / ``value`` [B, S, K, H] with N a
    multiple of K (grouped-query attention). Returns [B, T, N, H_v], sharded like
    the query. T and S must divide by the axis size P (by 2P for causal attention
    with ``load_balance``, the zig-zag reorder that equalises the devices' work).
    ``strategy``: "ring" (keys and values travel; no device holds all of them) or
    "all_gather" (each device gathers all keys and values). ``mesh``: a
    ``jax.sharding.Mesh`` or the abstract mesh of a traced function. Attention
    masks as arrays, biases and attention dropout are not supported here.
    ``block_q`` / ``block_kv``: the chunked kernel's tile sizes per device.
    """
    q_segment_ids = _attention._as_array(q_segment_ids, "q_segment_ids")
    kv_segment_ids = _attention._as_array(kv_segment_ids, "kv_segment_ids")
    _attention._check_inputs(query, key, value, None)
    _attention._check_lengths(query, q_lengths, kv_lengths)
    _attention._check_scalars(0.0, scale)
    q_segment_ids, kv_segment_ids = _attention._check_segment_ids(query, key, q_segment_ids,
                                                                  kv_segment_ids)
    local_window = _attention._check_window(local_window)
    plan = _make_plan(query.shape, key.shape, mesh=mesh, axis_name=axis_name,
                      strategy=strategy, causal=causal, local_window=local_window, scale=scale,
                      load_balance=load_balance, block_q=block_q, block_kv=block_kv)
    b, t = query.shape[:2]
    s = key.shape[1]
    if q_lengths is not None or kv_lengths is not None:
        q_segment_ids = _segments_with_lengths(q_segment_ids, q_lengths, t, b)
        kv_segment_ids = _segments_with_lengths(kv_segment_ids, kv_lengths, s, b)
    if q_segment_ids is not None or kv_segment_ids is not None:  # both, or neither
        q_segment_ids, kv_segment_ids = (
            jnp.ones((b, length), jnp.int32) if ids is None else jnp.asarray(ids, jnp.int32)
            for ids, length in ((q_segment_ids, t), (kv_segment_ids, s)))
    if b == 0:
        return jnp.zeros(query.shape[:3] + value.shape[3:], value.dtype)
    return _context_parallel(plan, query, key, value, q_segment_ids, kv_segment_ids)


def tile_counts(query_shape, key_shape, *, mesh, axis_name: str = CONTEXT_AXIS,
                strategy: str = "ring", causal: bool = False, local_window=None,
                load_balance: bool = True, block_q: int = DEFAULT_BLOCK_Q,
                block_kv: int = DEFAULT_BLOCK_KV) -> list[int]:
    """(query tile, key tile) pairs each device's forward pass computes, per device.

    Runs the attention's own visiting order (``_visit``: which device's keys, at
    which absolute positions, at each ring step) on ``mesh``, counting at each
    visit the key tiles the chunked kernel's loop bounds (``_kv_block_range``)
    let each query tile see: the work done, not an estimate. A tile is ``block_q
    x block_kv`` scores and two matmuls per head; the backward pass visits the
    same pairs.
    """
    plan = _make_plan(tuple(query_shape), tuple(key_shape), mesh=mesh, axis_name=axis_name,
                      strategy=strategy, causal=causal,
                      local_window=_attention._check_window(local_window), scale=1.0,
                      load_balance=load_balance, block_q=block_q, block_kv=block_kv)
    bl = plan.blocking
    num_q, num_kv = -(-plan.q_run // bl.block_q), -(-bl.kv_length // bl.block_kv)
    query_tiles = jnp.arange(num_q)

    def count(moving):
        device = lax.axis_index(axis_name)
        q_starts = _run_starts(plan, device, plan.q_run)

        def compute(total, moving, kv_starts):
            for q_start in q_starts:
                for kv_start in kv_starts:
                    lo, hi = _kv_block_range(bl, query_tiles, num_q, num_kv,
                                             _pair_extras(None, None, q_start, kv_start))
                    total += jnp.sum(jnp.maximum(jnp.broadcast_to(hi - lo, (num_q,)), 0))
            return total, moving

        return _visit(plan, compute, jnp.zeros((), jnp.int32), moving, device)[0][None]

    counts = jax.jit(jax.shard_map(count, mesh=mesh, in_specs=PartitionSpec(),
                                   out_specs=PartitionSpec(axis_name), check_vma=False))(
        jnp.zeros((), jnp.int32))
    return [int(c) for c in counts]
