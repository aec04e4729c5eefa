"""The 2x rule's own behaviour (mimic_fast.testing.assert_within_2x)."""
import pytest
import torch

from mimic_fast.testing import assert_within_2x


def test_2x_rule_fails_beyond_twice_pytorchs_error():
    ref = torch.tensor([1.0, -3.0, 0.5], dtype=torch.float64)
    base = (ref + torch.tensor([0.0, 0.01, 0.0], dtype=torch.float64)).bfloat16()  # error ~0.01
    assert_within_2x((ref + 0.019).bfloat16(), ref, base)
    with pytest.raises(AssertionError, match="2 x PyTorch's"):
        assert_within_2x((ref + torch.tensor([0.0, 0.0, 0.2], dtype=torch.float64)).bfloat16(), ref,
                         base)


def test_2x_rule_allows_one_ulp_of_the_largest_element_and_no_more():
    # a baseline that lands exactly on the reference leaves only the atol: one bf16 ulp of the
    # largest |reference| (eps · 2^floor(log2 3) = 2^-7 · 2 here) passes, two do not
    ref = torch.tensor([3.0, 0.25], dtype=torch.float64)
    ulp = torch.finfo(torch.bfloat16).eps * 2.0
    assert_within_2x((ref + torch.tensor([ulp, 0.0], dtype=torch.float64)).bfloat16(), ref,
                     ref.bfloat16())
    with pytest.raises(AssertionError):
        assert_within_2x((ref + torch.tensor([2 * ulp, 0.0], dtype=torch.float64)).bfloat16(), ref,
                         ref.bfloat16())
