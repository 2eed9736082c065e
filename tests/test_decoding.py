"""Decoding: beam search vs brute force, sampling rules, and decoding a real model's cache."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tfx_jax as tfx
from tfx_jax import decoding

VOCAB, EOS, BOS = 4, 1, 2


def markov_step(table):
    """A 'model' whose next-token log-probs depend only on the last token; the cache counts steps."""
    table = jnp.asarray(table, jnp.float32)

    def step(tokens, cache):
        return table[tokens], cache + tokens.shape[1]
    return step


def brute_force_best(table, max_len, alpha):
    """Enumerates every sequence ending in EOS (or cut at max_len) and scores it exactly."""
    best = (-np.inf, None)
    for length in range(1, max_len + 1):
        for seq in itertools.product(range(VOCAB), repeat=length):
            if EOS in seq[:-1] or (seq[-1] != EOS and length < max_len):
                continue
            if seq[-1] != EOS:
                continue
            logp, prev = 0.0, BOS
            for tok in seq:
                logp += table[prev][tok]
                prev = tok
            score = logp / ((5 + length) / 6) ** alpha
            best = max(best, (score, seq))
    return best


def greedy_trap_table(seed):
    """Random log-softmax rows, plus a trap: after BOS, token 3 is likelier than token 0, but
    only token 0 leads to a confident EOS (p("0 EOS") = 0.4 * 0.99 > p("3 ...") <= 0.6 * 0.25)."""
    probs = np.random.default_rng(seed).dirichlet(np.ones(VOCAB), size=VOCAB)
    probs[BOS] = [0.4, 1e-3, 1e-3, 0.598]
    probs[3] = [0.25, 0.25, 0.25, 0.25]
    probs[0] = [0.003, 0.99, 0.004, 0.003]
    return np.log(probs / probs.sum(-1, keepdims=True))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_beam_search_finds_brute_force_optimum(seed):
    table = greedy_trap_table(seed)
    max_len, alpha = 5, 0.6
    seqs, scores = decoding.beam_search(markov_step(table), jnp.zeros(()), batch_size=1,
                                        beam_size=8, max_len=max_len, bos_id=BOS, eos_id=EOS,
                                        alpha=alpha)
    best_score, best_seq = brute_force_best(table, max_len, alpha)
    got = [int(t) for t in seqs[0, 0]]
    assert tuple(got[:len(best_seq)]) == best_seq
    assert float(scores[0, 0]) == pytest.approx(best_score, abs=1e-5)
    assert np.all(np.diff(np.asarray(scores[0])) <= 1e-6)  # best first


def sequence_score(table, seq, alpha):
    """Length-normalised log-probability of ``seq`` (without BOS) under the Markov table."""
    logp = sum(table[prev][tok] for prev, tok in zip((BOS, *seq), seq))
    return logp / ((5 + len(seq)) / 6) ** alpha


def test_beam_search_beats_greedy_on_trap():
    """Greedy takes the likelier first token 3 into a flat distribution; beam search (beam 4,
    alpha 0.6: the paper's) keeps the token-0 branch and returns "0 EOS", which scores higher."""
    table = greedy_trap_table(0)
    greedy = decoding.sample(markov_step(table), jnp.zeros(()), jnp.full((1, 1), BOS), 4,
                             temperature=0.0, eos_id=EOS)
    greedy_seq = [int(t) for t in greedy[0, 1:]]
    assert greedy_seq[0] == 3  # greedy walks into the trap
    greedy_seq = greedy_seq[:greedy_seq.index(EOS) + 1] if EOS in greedy_seq else greedy_seq
    seqs, scores = decoding.beam_search(markov_step(table), jnp.zeros(()), batch_size=1,
                                        beam_size=4, max_len=5, bos_id=BOS, eos_id=EOS)
    assert [int(t) for t in seqs[0, 0]] == [0, EOS, 0, 0, 0]  # "0 EOS", then padding
    assert float(scores[0, 0]) == pytest.approx(sequence_score(table, (0, EOS), 0.6), abs=1e-5)
    assert float(scores[0, 0]) > sequence_score(table, greedy_seq, 0.6) + 0.5


def test_gather_beams_reorders_batch_axis_and_leaves_scalars():
    tree = {"a": jnp.arange(6).reshape(6, 1), "i": jnp.array(3), "other": jnp.arange(5)}
    out = decoding.gather_beams(tree, jnp.array([[2, 2, 0], [1, 0, 0]]))
    np.testing.assert_array_equal(out["a"][:, 0], [2, 2, 0, 4, 3, 3])
    assert int(out["i"]) == 3 and out["other"].shape == (5,)


def test_sampling_keeps_prompt_respects_top_k_and_eos():
    table = np.log(np.full((VOCAB, VOCAB), 1.0 / VOCAB))
    table[:, 0] = np.log(0.97)  # token 0 dominates; top_k=1 must always pick it
    prompt = jnp.array([[3, 2, 3], [2, 2, 2]])
    out = decoding.sample(markov_step(table), jnp.zeros(()), prompt, 5,
                          rng=jax.random.key(0), top_k=1)
    np.testing.assert_array_equal(out[:, :3], prompt)
    np.testing.assert_array_equal(out[:, 3:], 0)
    eos_table = np.full((VOCAB, VOCAB), -10.0)
    eos_table[:, EOS] = 0.0
    stopped = decoding.sample(markov_step(eos_table), jnp.zeros(()), prompt, 4,
                              rng=jax.random.key(1))
    np.testing.assert_array_equal(stopped[:, 3:], EOS)
    with pytest.raises(ValueError, match="needs an rng"):
        decoding.sample(markov_step(table), jnp.zeros(()), prompt, 2)


def test_sampling_frequencies_follow_temperature():
    probs = np.array([0.1, 0.2, 0.3, 0.4])
    table = np.log(np.tile(probs, (VOCAB, 1)))
    out = decoding.sample(markov_step(table), jnp.zeros(()), jnp.zeros((4000, 1), jnp.int32), 1,
                          rng=jax.random.key(2), temperature=0.5)
    sharpened = probs ** 2 / (probs ** 2).sum()  # softmax(log p / 0.5)
    freq = np.bincount(np.asarray(out[:, 1]), minlength=VOCAB) / 4000
    np.testing.assert_allclose(freq, sharpened, atol=0.03)


def test_greedy_decoding_of_a_transformer_equals_argmax_of_full_passes():
    cfg = tfx.TransformerConfig(vocab_size=20, d_model=16, num_heads=2, d_ff=32,
                                num_encoder_layers=1, num_decoder_layers=2, max_len=8,
                                dropout_rate=0.0)
    model, decoder = tfx.Transformer(cfg), tfx.Transformer(cfg.replace(decode=True))
    src = jax.random.randint(jax.random.key(0), (2, 5), 3, 20)
    params = model.init(jax.random.key(1), src, src)["params"]
    encoded = model.apply({"params": params}, src, method=tfx.Transformer.encode)
    beams = 3
    cache = decoder.init(jax.random.key(0), decoding.repeat_for_beams(src, beams),
                         jnp.zeros((2 * beams, 6), jnp.int32))["cache"]

    def step(tokens, cache, encoded=encoded, src=src, n=1):
        logits, mutated = decoder.apply(
            {"params": params, "cache": cache}, decoding.repeat_for_beams(encoded, n),
            decoding.repeat_for_beams(src, n), tokens, method=tfx.Transformer.decode,
            mutable=["cache"])
        return logits, mutated["cache"]

    greedy_cache = decoder.init(jax.random.key(0), src, jnp.zeros((2, 6), jnp.int32))["cache"]
    greedy = jax.jit(lambda c: decoding.sample(step, c, jnp.full((2, 1), BOS), 5,
                                               temperature=0.0))(greedy_cache)
    # Each greedy token is the argmax of a full (uncached) pass over the tokens before it:
    # one causal pass over the whole greedy prefix gives all of those logits at once.
    logits = jax.jit(model.apply)({"params": params}, src, greedy[:, :5])
    np.testing.assert_array_equal(greedy[:, 1:6], jnp.argmax(logits, -1))
    seqs, scores = jax.jit(lambda c: decoding.beam_search(
        lambda t, c: step(t, c, n=beams), c, batch_size=2, beam_size=beams, max_len=6,
        bos_id=BOS, eos_id=EOS))(cache)
    assert seqs.shape == (2, beams, 6) and np.isfinite(np.asarray(scores)).all()


def test_per_row_keys_make_each_row_independent_of_the_others():
    """With one key per row, a row's draws depend on its key only: the same in any batch."""
    table = jax.random.normal(jax.random.key(1), (VOCAB, VOCAB))  # next token | last token
    draw = jax.jit(lambda prompts, rng: decoding.sample(markov_step(table), 0, prompts, 12,
                                                        rng=rng, temperature=1.0))
    keys = jax.random.split(jax.random.key(0), 3)
    prompts = jnp.array([[0], [2], [3]], jnp.int32)
    batch = draw(prompts, keys)
    for row in range(3):
        np.testing.assert_array_equal(batch[row], draw(prompts[row:row + 1],
                                                       keys[row:row + 1])[0])
    assert not np.array_equal(draw(prompts, keys[0])[1:], batch[1:])  # one key for all rows
    calls = []

    def counted_step(tokens, cache):
        calls.append(tokens.shape)
        return markov_step(table)(tokens, cache)

    with pytest.raises(ValueError, match="rng holds 3 keys .* batch of 2 rows"):
        decoding.sample(counted_step, 0, prompts[:2], 2, rng=keys)
    assert calls == []  # refused before the model ran


def test_left_pad_puts_prompts_at_the_end_with_positions_and_segments():
    tokens, positions, segment_ids = decoding.left_pad([[7, 8], [3, 4, 5]], length=4)
    np.testing.assert_array_equal(tokens, [[0, 0, 7, 8], [0, 3, 4, 5]])
    np.testing.assert_array_equal(positions, [[0, 0, 0, 1], [0, 0, 1, 2]])
    np.testing.assert_array_equal(segment_ids, [[0, 0, 1, 1], [0, 1, 1, 1]])
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        decoding.left_pad([[1], []])
    with pytest.raises(ValueError, match=r"length=2 is shorter than the longest prompt \(3"):
        decoding.left_pad([[1, 2, 3]], length=2)


def test_cache_overflow_is_refused_before_decoding_even_under_jit():
    cfg = tfx.CausalLMConfig(vocab_size=20, d_model=16, num_heads=2, d_ff=32, num_layers=1,
                             max_len=8, dropout_rate=0.0, decode=True)
    decoder = tfx.CausalLM(cfg)
    variables = decoder.init(jax.random.key(0), jnp.zeros((1, 5), jnp.int32))
    calls = []

    def step(tokens, cache):
        calls.append(tokens.shape)
        logits, mutated = decoder.apply({"params": variables["params"], "cache": cache}, tokens,
                                        mutable=["cache"])
        return logits, mutated["cache"]

    prompt = jnp.ones((1, 3), jnp.int32)
    assert decoding.cache_capacity(variables["cache"]) == (5, 0)
    with pytest.raises(ValueError, match=r"sample \(prompt of 3 \+ 4 steps - 1\) feeds 6 "
                                         r"tokens but the cache holds max_length=5"):
        jax.jit(lambda c: decoding.sample(step, c, prompt, 4, temperature=0.0))(
            variables["cache"])
    assert calls == []  # refused before the model ran
    out = jax.jit(lambda c: decoding.sample(step, c, prompt, 3, temperature=0.0))(
        variables["cache"])
    assert out.shape == (1, 6)
    with pytest.raises(ValueError, match=r"beam_search \(max_len=6\) feeds 6 tokens"):
        decoding.beam_search(step, variables["cache"], batch_size=1, beam_size=1, max_len=6,
                             bos_id=BOS, eos_id=EOS)


def test_sampling_stops_at_any_of_several_eos_ids():
    """Llama 3 ends a turn with any of several ids: after one of them a row emits the
    first id of the tuple (one id, as before: that id)."""
    table = np.full((VOCAB, VOCAB), -10.0)
    for token in range(VOCAB):
        table[token, (token + 1) % VOCAB] = 0.0  # greedy walks 0 -> 1 -> 2 -> 3 -> 0
    prompt = jnp.array([[0]])
    out = decoding.sample(markov_step(table), jnp.zeros(()), prompt, 5, temperature=0.0,
                          eos_id=(3, 2))
    assert [int(t) for t in out[0]] == [0, 1, 2, 3, 3, 3]
    single = decoding.sample(markov_step(table), jnp.zeros(()), prompt, 3, temperature=0.0,
                             eos_id=2)
    assert [int(t) for t in single[0]] == [0, 1, 2, 2]
