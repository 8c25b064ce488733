"""The policy's start-up check that it and the reference mean the same text by each token id,
asked of a real reference server."""

from __future__ import annotations

import pytest

from services.common.models import load_tokenizer, tokenizer_fingerprint
from services.policy.startup import TokenizerMismatch, check_same_tokenizer


def test_same_tokenizer_passes_against_the_reference(reference, tiny_lm_dir):
    check_same_tokenizer(load_tokenizer(str(tiny_lm_dir)), reference.stub)


def test_a_different_tokenizer_is_a_mismatch(reference, tiny_lm_dir, other_tokenizer_lm_dir):
    ours = load_tokenizer(str(other_tokenizer_lm_dir))
    theirs = load_tokenizer(str(tiny_lm_dir))
    assert tokenizer_fingerprint(ours) != tokenizer_fingerprint(theirs)
    with pytest.raises(TokenizerMismatch, match="differs from the policy's") as caught:
        check_same_tokenizer(ours, reference.stub)
    assert tokenizer_fingerprint(theirs)[:12] in str(caught.value)
    assert tokenizer_fingerprint(ours)[:12] in str(caught.value)


def test_a_tokenizer_differing_only_in_special_tokens_is_a_mismatch(reference, tiny_lm_dir):
    ours = load_tokenizer(str(tiny_lm_dir))
    ours.add_special_tokens({"additional_special_tokens": ["<|tool|>"]})
    with pytest.raises(TokenizerMismatch):
        check_same_tokenizer(ours, reference.stub)
