"""The statistics' definitions on hand-computed distributions."""

import math

import pytest
import torch

from attentropy.entropy import entropy_varentropy


def test_uniform_over_k_keys_has_entropy_ln_k_and_zero_varentropy():
    for k in (1, 2, 7, 4096):
        h, v = entropy_varentropy(torch.log_softmax(torch.zeros(k), -1))
        assert math.isclose(h.item(), math.log(k), abs_tol=1e-5)
        assert abs(v.item()) < 1e-5


def test_one_hot_has_zero_entropy_and_zero_varentropy():
    logp = torch.log(torch.tensor([0.0, 1.0, 0.0, 0.0]))
    h, v = entropy_varentropy(logp)
    assert h.item() == 0.0 and v.item() == 0.0


def test_hand_computed_distribution_in_nats():
    p = torch.tensor([0.5, 0.25, 0.25])
    h, v = entropy_varentropy(p.log())
    # -ln p = (ln2, 2ln2, 2ln2): mean 1.5 ln2, variance 0.25 (ln2)^2
    assert math.isclose(h.item(), 1.5 * math.log(2), rel_tol=1e-6)
    assert math.isclose(v.item(), 0.25 * math.log(2) ** 2, rel_tol=1e-5)


def test_masked_items_contribute_exactly_zero_and_give_no_nan():
    visible = torch.tensor([1.0, 2.0, 0.5])
    masked = torch.cat([visible, torch.full((5,), float("-inf"))])
    finite_masked = torch.cat([visible, torch.full((5,), torch.finfo(torch.float32).min)])  # eager-mask style
    ref = entropy_varentropy(torch.log_softmax(visible, -1))
    for scores in (masked, finite_masked):
        h, v = entropy_varentropy(torch.log_softmax(scores, -1))
        assert torch.isfinite(h) and torch.isfinite(v)
        assert h.item() == ref[0].item() and v.item() == ref[1].item()


def test_varentropy_is_variance_of_surprisal_not_across_axis():
    torch.manual_seed(0)
    logp = torch.log_softmax(torch.randn(3, 50), -1)
    h, v = entropy_varentropy(logp)
    p = logp.exp()
    mean = (p * -logp).sum(-1)
    var = (p * (-logp - mean[:, None]) ** 2).sum(-1)
    torch.testing.assert_close(h, mean)
    torch.testing.assert_close(v, var)
    assert (v > 0).all()


def test_probabilities_give_the_log_probabilities_statistics_and_inputs_stay_unchanged():
    torch.manual_seed(1)
    scores = torch.randn(4, 30) * 3
    scores[:, :7] = torch.finfo(torch.float32).min  # masked keys: p = 0 exactly
    logp = torch.log_softmax(scores, -1)
    p = torch.softmax(scores, -1)
    logp_before, p_before = logp.clone(), p.clone()
    h_logp, v_logp = entropy_varentropy(logp)
    h_p, v_p = entropy_varentropy(p=p)
    assert torch.equal(logp, logp_before) and torch.equal(p, p_before)
    assert torch.isfinite(h_p).all() and torch.isfinite(v_p).all()
    torch.testing.assert_close(h_p, h_logp, rtol=0, atol=1e-6)
    torch.testing.assert_close(v_p, v_logp, rtol=0, atol=1e-5)
    with pytest.raises(TypeError):
        entropy_varentropy(logp, p=p)
    with pytest.raises(TypeError):
        entropy_varentropy()
