"""Normalized text keys and the training fingerprint: what the leakage guard and evaluate's warning rely on."""

from __future__ import annotations

import pytest

from embedtune.overlap import (
    FINGERPRINT_SIZE,
    fingerprint_overlap,
    normalize_text,
    text_key,
    train_fingerprint,
)


def test_normalization_folds_case_unicode_compatibility_forms_and_whitespace():
    assert normalize_text("  Ｗhat IS\tthe\n capital?  ") == "what is the capital?"
    assert normalize_text("ﬁne Straße") == normalize_text("FINE STRASSE") == "fine strasse"
    assert text_key("What is  X?") == text_key("what is x?") != text_key("what is y?")


def rows(n: int, prefix: str = "q") -> list[dict]:
    return [{"query": f"{prefix} query {i}", "response": f"{prefix} doc {i}"} for i in range(n)]


def test_a_small_training_set_is_fingerprinted_whole_and_checked_exactly():
    fp = train_fingerprint(rows(50))
    assert fp["texts"] == 100 and len(fp["keys"]) == 100
    seen = ["Q QUERY 3", "q doc 7", "never seen", "q  query 9"]
    got = fingerprint_overlap(fp, seen)
    assert got == {"eval_texts": 4, "compared": 4, "found": 3, "exact": True, "fraction": 0.75}
    assert fingerprint_overlap({"scheme": "other"}, seen) is None and fingerprint_overlap(None, seen) is None


def test_a_large_training_set_keeps_a_bounded_sketch_that_estimates_the_overlap():
    train = rows(20000)
    fp = train_fingerprint(train)
    assert fp["texts"] == 40000 and len(fp["keys"]) == FINGERPRINT_SIZE
    half_seen = [r["query"] for r in train[:10000]] + [f"unseen {i}" for i in range(10000)]
    got = fingerprint_overlap(fp, half_seen)
    assert not got["exact"] and 700 < got["compared"] < 1400  # ~ 20000 * 2048 / 40000 = 1024
    assert got["fraction"] == pytest.approx(0.5, abs=0.1)
    assert fingerprint_overlap(fp, [f"unseen {i}" for i in range(10000)])["found"] == 0
