"""Losses and accuracies vs float64 NumPy references."""
import jax.numpy as jnp
import numpy as np
import pytest

from tfx_jax import train as tr


def np_log_softmax(logits):
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def np_smoothed_ce(logits, labels, alpha):
    """Cross-entropy against (1 - alpha) * one_hot + alpha / K, per position, float64."""
    k = logits.shape[-1]
    target = np.full(logits.shape, alpha / k, np.float64)
    np.put_along_axis(target, labels[..., None], 1 - alpha + alpha / k, axis=-1)
    return -(target * np_log_softmax(logits)).sum(-1)


@pytest.fixture
def padded_batch():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 5, 7)).astype(np.float32) * 3
    targets = rng.integers(1, 7, size=(3, 5)).astype(np.int32)
    targets[0, 3:] = 0
    targets[2, 1:] = 0
    return logits, targets


@pytest.mark.parametrize("alpha", [0.0, 0.1, 0.3])
def test_token_cross_entropy_matches_numpy_with_padding(padded_batch, alpha):
    logits, targets = padded_batch
    loss, count = tr.token_cross_entropy(jnp.asarray(logits), jnp.asarray(targets),
                                         label_smoothing=alpha)
    real = targets != 0
    want = np_smoothed_ce(logits, targets, alpha)[real].mean()
    assert float(count) == real.sum() == 9
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)


def test_token_cross_entropy_ignores_logits_at_padding(padded_batch):
    logits, targets = padded_batch
    garbage = logits.copy()
    garbage[targets == 0] = 1e4
    a, _ = tr.token_cross_entropy(jnp.asarray(logits), jnp.asarray(targets), label_smoothing=0.1)
    b, _ = tr.token_cross_entropy(jnp.asarray(garbage), jnp.asarray(targets),
                                  label_smoothing=0.1)
    assert float(a) == float(b)


def test_token_cross_entropy_all_padding_is_zero_with_zero_count():
    loss, count = tr.token_cross_entropy(jnp.ones((2, 3, 4)), jnp.zeros((2, 3), jnp.int32))
    assert float(loss) == 0.0 and float(count) == 0.0


def test_token_cross_entropy_bfloat16_logits_computed_in_float32(padded_batch):
    logits, targets = padded_batch
    loss, _ = tr.token_cross_entropy(jnp.asarray(logits, jnp.bfloat16), jnp.asarray(targets))
    assert loss.dtype == jnp.float32
    want = np_smoothed_ce(np.asarray(jnp.asarray(logits, jnp.bfloat16), np.float64),
                          targets, 0.0)[targets != 0].mean()
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)


@pytest.mark.parametrize("alpha", [0.0, 0.2])
def test_classification_cross_entropy_matches_numpy(alpha):
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(6, 4)).astype(np.float32)
    labels = rng.integers(0, 4, size=6).astype(np.int32)
    got = tr.classification_cross_entropy(jnp.asarray(logits), jnp.asarray(labels),
                                          label_smoothing=alpha)
    np.testing.assert_allclose(float(got), np_smoothed_ce(logits, labels, alpha).mean(),
                               rtol=1e-5)


def test_accuracies(padded_batch):
    logits, targets = padded_batch
    acc, count = tr.token_accuracy(jnp.asarray(logits), jnp.asarray(targets))
    real = targets != 0
    want = (logits.argmax(-1) == targets)[real].mean()
    np.testing.assert_allclose(float(acc), want, rtol=1e-6)
    assert float(count) == real.sum()
    labels = np.array([0, 1, 2, 2])
    cls_logits = np.eye(3, dtype=np.float32)[[0, 1, 1, 2]]
    assert float(tr.classification_accuracy(jnp.asarray(cls_logits), jnp.asarray(labels))) == 0.75


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match=r"logits \(2, 3, 4\) must be targets \(2, 4\)"):
        tr.token_cross_entropy(jnp.ones((2, 3, 4)), jnp.ones((2, 4), jnp.int32))
    with pytest.raises(TypeError, match="integer class ids"):
        tr.classification_cross_entropy(jnp.ones((2, 4)), jnp.ones((2,)))
    with pytest.raises(ValueError, match="label_smoothing"):
        tr.classification_cross_entropy(jnp.ones((2, 4)), jnp.ones((2,), jnp.int32),
                                        label_smoothing=1.0)


def test_classification_losses_with_weights_ignore_padding_rows():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(5, 4)).astype(np.float32)
    labels = np.array([0, 1, 2, 3, 0], np.int32)
    valid = np.array([True, True, False, True, False])
    garbage = logits.copy()
    garbage[~valid] = 1e4  # padding rows must not matter
    loss = tr.classification_cross_entropy(jnp.asarray(garbage), jnp.asarray(labels),
                                           label_smoothing=0.1, weights=jnp.asarray(valid))
    np.testing.assert_allclose(float(loss), np_smoothed_ce(logits, labels, 0.1)[valid].mean(),
                               rtol=1e-5)
    acc = tr.classification_accuracy(jnp.asarray(garbage), jnp.asarray(labels),
                                     weights=jnp.asarray(valid))
    np.testing.assert_allclose(float(acc), (logits.argmax(-1) == labels)[valid].mean())
    with pytest.raises(ValueError, match="weights"):
        tr.classification_accuracy(jnp.asarray(logits), jnp.asarray(labels),
                                   weights=jnp.ones((4,)))


@pytest.mark.parametrize("chunk,alpha", [(2, 0.0), (3, 0.1), (5, 0.0), (8, 0.3)])
def test_chunked_token_losses_match_numpy_and_the_full_logits_gradient(chunk, alpha):
    """Chunks of 2, 3 (a partial last chunk), the whole row and more than the row: the
    loss and accuracy of float64 NumPy on the full logits, and the gradients of the
    unchunked loss (a chunk's logits are recomputed in the backward pass)."""
    import jax

    rng = np.random.default_rng(1)
    hidden = rng.normal(size=(3, 5, 4)).astype(np.float32)
    kernel = rng.normal(size=(4, 7)).astype(np.float32)
    targets = rng.integers(1, 7, size=(3, 5)).astype(np.int32)
    targets[0, 3:] = 0
    weights = (targets != 0).astype(np.float32)
    weights[1, :2] = 0  # a loss mask: prompt tokens
    logits = (hidden.astype(np.float64) @ kernel)
    real = weights > 0
    want_loss = np_smoothed_ce(logits, targets, alpha)[real].mean()
    want_accuracy = (logits.argmax(-1) == targets)[real].mean()

    def chunked(h, w):
        return tr.chunked_token_losses(h, jnp.asarray(targets), lambda x: x @ w,
                                       chunk_length=chunk, label_smoothing=alpha,
                                       weights=jnp.asarray(weights))

    loss, accuracy, count = jax.jit(chunked)(jnp.asarray(hidden), jnp.asarray(kernel))
    assert float(count) == real.sum()
    np.testing.assert_allclose(float(loss), want_loss, rtol=1e-5)
    np.testing.assert_allclose(float(accuracy), want_accuracy, rtol=1e-6)

    def full(h, w):
        return tr.token_cross_entropy(h @ w, jnp.asarray(targets), label_smoothing=alpha,
                                      weights=jnp.asarray(weights))[0]

    got = jax.grad(lambda h, w: chunked(h, w)[0], argnums=(0, 1))(hidden, kernel)
    ref = jax.grad(full, argnums=(0, 1))(hidden, kernel)
    for g, r in zip(got, ref):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-5, atol=1e-6)


def test_chunked_token_losses_never_hold_the_full_logits():
    """The compiled program's largest buffer is a chunk's logits, not the row's: rows of
    256 positions over a vocabulary of 4096 are 4 MiB of float32 logits; chunks of 16 are
    256 KiB, and the whole step stays under a row's logits."""
    import jax

    hidden = jax.ShapeDtypeStruct((1, 256, 8), jnp.float32)
    kernel = jax.ShapeDtypeStruct((8, 4096), jnp.float32)
    targets = jax.ShapeDtypeStruct((1, 256), jnp.int32)

    def step(chunk):
        def loss(h, w, t):
            return tr.chunked_token_losses(h, t, lambda x: x @ w, chunk_length=chunk)[0]
        compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(hidden, kernel,
                                                                 targets).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    row_logits = 256 * 4096 * 4
    assert step(256) >= row_logits  # one chunk: the whole row's logits at once
    assert step(16) < row_logits / 4
