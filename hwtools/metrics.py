"""Evaluation metrics: COCO caption scores (BLEU-1..4, METEOR, ROUGE-L, CIDEr), sentence BLEU, chrF, perplexity.

Caption scores come from pycocoevalcap, the COCO caption evaluation that papers report; chrF from sacrebleu.
`evaluate.load` is not used: it fetches its metric scripts from the hub and fails offline.
"""
from __future__ import annotations

import logging
import math
import os
import re
import shutil
import sys
import tempfile
from typing import Hashable, Sequence

logger = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------------ captions


def caption_scores(references: dict[Hashable, list[str]], hypotheses: dict[Hashable, str]) -> dict:
    """Corpus-level BLEU-1..4, METEOR, ROUGE-L and CIDEr of one caption per image against all its references.

    Returns floats under bleu1..bleu4, meteor, rouge_l, cider, plus `tokenizer` ("ptb", or "simple" without Java).
    METEOR needs Java: without it (or if its jar fails) `meteor` is None and `unavailable` lists it. CIDEr's idf
    comes from the scored images themselves, so it is 0 for a single image and only comparable on the same split.
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    _check_caption_inputs(references, hypotheses)
    has_java = shutil.which("java") is not None
    tokenized = _ptb_tokenize(references, hypotheses) if has_java else None
    tokenizer = "ptb"
    if tokenized is None:
        tokenizer = "simple"
        tokenized = ({k: [_simple_text(r) for r in refs] for k, refs in references.items()},
                     {k: [_simple_text(h)] for k, h in hypotheses.items()})
    gts, res = tokenized

    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)  # verbose=0: no prints to our stdout
    rouge, _ = Rouge().compute_score(gts, res)
    cider, _ = Cider().compute_score(gts, res)
    meteor = _meteor(gts, res) if has_java else None

    scores = {f"bleu{n}": float(b) for n, b in enumerate(bleu, start=1)}
    scores.update(meteor=meteor, rouge_l=float(rouge), cider=float(cider), tokenizer=tokenizer)
    if meteor is None:
        scores["unavailable"] = ["meteor"]
    return scores


def _check_caption_inputs(references: dict, hypotheses: dict) -> None:
    if not hypotheses:
        raise ValueError("caption_scores: no hypotheses to score")
    if set(references) != set(hypotheses):
        missing = sorted(map(str, set(hypotheses) ^ set(references)))[:5]
        raise ValueError(f"caption_scores: references and hypotheses cover different images, e.g. {missing}")
    for key, refs in references.items():
        if isinstance(refs, str) or not refs:
            raise ValueError(f"caption_scores: image {key!r} needs a non-empty list of reference captions")
        if not isinstance(hypotheses[key], str):
            raise ValueError(f"caption_scores: hypothesis of image {key!r} is not a string")


def _ptb_tokenize(references: dict, hypotheses: dict) -> tuple[dict, dict] | None:
    """PTB-tokenise references and hypotheses in one Java start -> (gts, res), or None when the tokenizer fails."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    groups = {("ref", k): [{"caption": _one_line(r)} for r in refs] for k, refs in references.items()}
    groups.update({("hyp", k): [{"caption": _one_line(h)}] for k, h in hypotheses.items()})
    try:
        out, java_stderr = _call_with_stderr_captured(lambda: PTBTokenizer().tokenize(groups))
    except Exception as e:  # Java present but unusable (e.g. no write access to the package dir)
        logger.warning("PTB tokenizer failed (%s: %s); using simple tokenisation", type(e).__name__, e)
        return None
    # The wrapper zips its output lines with the inputs, so a short output silently drops captions: check counts.
    if any(len(out.get(key, ())) != len(items) for key, items in groups.items()):
        logger.warning("PTB tokenizer returned too few lines (%s); using simple tokenisation", java_stderr.strip())
        return None
    return ({k: out[("ref", k)] for k in references}, {k: out[("hyp", k)] for k in hypotheses})


def _meteor(gts: dict, res: dict) -> float | None:
    """METEOR 1.5 through pycocoevalcap's jar, or None when the jar does not run."""
    from pycocoevalcap.meteor.meteor import Meteor

    scorer = None
    try:
        scorer = Meteor()
        score, _ = scorer.compute_score(gts, res)
        return float(score)
    except Exception as e:
        logger.warning("METEOR unavailable (%s: %s)", type(e).__name__, e)
        return None
    finally:
        if scorer is not None:
            _close_meteor(scorer)


def _close_meteor(scorer) -> None:
    # Meteor.__del__ waits on a lock that compute_score leaves held when it raises; release it so cleanup can't hang.
    if scorer.lock.locked():
        scorer.lock.release()
    scorer.meteor_p.kill()
    scorer.meteor_p.wait()


def _call_with_stderr_captured(fn):
    """fn() -> (result, what was written to file descriptor 2 meanwhile). Java's PTBTokenizer writes a progress
    line straight to fd 2; this keeps it out of our output but at hand if the tokenizer fails."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):  # no real fd 2: nothing to protect
        return fn(), ""
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            result = fn()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        sink.seek(0)
        return result, sink.read().decode(errors="replace")


def _one_line(text: str) -> str:
    # A line break inside a caption would shift every later line of the tokenizer's output.
    return " ".join(text.split())


def _simple_tokens(text: str) -> list[str]:
    """Lower-cased word tokens with punctuation dropped (the PTB tokenizer's effect, without Java)."""
    return re.findall(r"\w+", text.lower())


def _simple_text(text: str) -> str:
    return " ".join(_simple_tokens(text))


# ------------------------------------------------------------------------------------------------ BLEU helpers


def sentence_bleu4(reference_list: list[str], hypothesis: str) -> float:
    """BLEU-4 of one caption against its references, for ranking errors: nltk's sentence_bleu with
    SmoothingFunction().method1 (zero n-gram counts get epsilon 0.1), on the simple lower-case, no-punctuation tokens.
    """
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

    refs = [tokens for tokens in map(_simple_tokens, reference_list) if tokens]
    hyp = _simple_tokens(hypothesis)
    if not refs or not hyp:
        return 0.0
    return float(sentence_bleu(refs, hyp, smoothing_function=SmoothingFunction().method1))


def nltk_corpus_bleu(references: Sequence[Sequence[str | Sequence[str]]], hypotheses: Sequence[str | Sequence[str]],
                     n: int) -> float:
    """Unsmoothed corpus BLEU-n (uniform weights) from nltk, on whitespace tokens or pre-tokenised lists."""
    from nltk.translate.bleu_score import corpus_bleu

    refs = [[_as_tokens(r) for r in refs_of_one] for refs_of_one in references]
    hyps = [_as_tokens(h) for h in hypotheses]
    return float(corpus_bleu(refs, hyps, weights=(1.0 / n,) * n))


def _as_tokens(text_or_tokens: str | Sequence[str]) -> list[str]:
    return text_or_tokens.split() if isinstance(text_or_tokens, str) else list(text_or_tokens)


# ------------------------------------------------------------------------------------------------ chat metrics


def chrf(hypotheses: list[str], references: list[str] | list[list[str]]) -> float:
    """Corpus chrF (sacrebleu, 0-100) of hypotheses against one reference each, or a list of references each
    (the best-matching one counts). Character n-grams, so it works for Persian without a word tokenizer."""
    from sacrebleu.metrics import CHRF

    if not hypotheses:
        raise ValueError("chrf: no hypotheses to score")
    if len(hypotheses) != len(references):
        raise ValueError(f"chrf: {len(hypotheses)} hypotheses but {len(references)} references")
    if any(not isinstance(h, str) for h in hypotheses):
        raise ValueError("chrf: every hypothesis must be a string")
    per_hyp = [[r] if isinstance(r, str) else list(r) for r in references]
    if any(not refs for refs in per_hyp):
        raise ValueError("chrf: a hypothesis has an empty reference list")
    # sacrebleu wants reference streams (the i-th reference of every segment); None pads segments with fewer refs.
    width = max(len(refs) for refs in per_hyp)
    streams = [[refs[i] if i < len(refs) else None for refs in per_hyp] for i in range(width)]
    return float(CHRF().corpus_score(list(hypotheses), streams).score)


def perplexity(mean_loss: float) -> float:
    """exp(mean token cross-entropy); inf when the loss is too large to exponentiate."""
    try:
        return math.exp(float(mean_loss))
    except OverflowError:
        return math.inf
