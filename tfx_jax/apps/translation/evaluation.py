"""Scoring translations: exact match and corpus BLEU (sacrebleu) over an evaluation split.

* ``exact_match``: the fraction (0..1) of hypotheses identical to their reference.
* ``bleu``: sacrebleu's corpus BLEU (0..100), the paper's metric (sec. 6.1).
  BLEU counts word n-grams up to 4 after sacrebleu's tokenizer (``"13a"`` by
  default, WMT's standard). A one-word target, such as a German number written
  as a single compound (``"dreihundertfünfundvierzig"``), has no 2-, 3- or
  4-grams, so word BLEU is 0 even for perfect output; pass
  ``bleu_tokenize="char"`` to count character n-grams there instead.

Decoding runs as one jit-compiled batch per evaluation batch, on the global
batch sharded over the mesh; every host gathers the token ids and scores the
whole split, so every host returns the same numbers.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import sacrebleu
from jax.experimental import multihost_utils

from tfx_jax.train import shard_batch
from tfx_jax.apps.translation.inference import translate
from tfx_jax.transformer import TransformerConfig


def translation_scores(hypotheses: Sequence[str], references: Sequence[str], *,
                       bleu_tokenize: str = "13a") -> dict[str, float]:
    """``{"exact_match": 0..1, "bleu": 0..100}`` of aligned hypotheses and references."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses for {len(references)} references")
    if not references:
        raise ValueError("no references to score")
    exact = np.mean([h == r for h, r in zip(hypotheses, references)])
    bleu = sacrebleu.corpus_bleu(list(hypotheses), [list(references)], tokenize=bleu_tokenize)
    return {"exact_match": float(exact), "bleu": float(bleu.score)}


def translate_eval_data(params, config: TransformerConfig, eval_data, tokenizer, mesh, *,
                        max_length: int, beam_size: int = 1, alpha: float = 0.6) -> list[str]:
    """Hypotheses for every example of ``eval_data`` (an ``EvalData``), in its reference order.

    Each process-local batch becomes a global array on ``mesh``; the decoded
    token ids are gathered on every host and the ``valid`` rows, in global
    order, line up with ``eval_data.references``.
    """
    hypotheses = []
    for batch in eval_data:
        batch = shard_batch({"inputs": batch["inputs"], "valid": batch["valid"]}, mesh)
        tokens = translate(params, config, batch["inputs"], max_length=max_length,
                           beam_size=beam_size, alpha=alpha)
        tokens, valid = multihost_utils.process_allgather((tokens, batch["valid"]), tiled=True)
        hypotheses += [tokenizer.decode(row) for row, ok in zip(tokens, valid) if ok]
    if len(hypotheses) != eval_data.num_examples:
        raise ValueError(f"decoded {len(hypotheses)} valid rows for "
                         f"{eval_data.num_examples} references")
    return hypotheses


def make_evaluate(config: TransformerConfig, eval_data, tokenizer, *, max_length: int,
                  beam_size: int = 1, alpha: float = 0.6, bleu_tokenize: str = "13a"):
    """The training loop's ``evaluate(params, step, mesh)``: exact match and BLEU on ``eval_data``."""

    def evaluate(params, step, mesh):
        del step
        hypotheses = translate_eval_data(params, config, eval_data, tokenizer, mesh,
                                         max_length=max_length, beam_size=beam_size, alpha=alpha)
        return translation_scores(hypotheses, eval_data.references, bleu_tokenize=bleu_tokenize)

    return evaluate
