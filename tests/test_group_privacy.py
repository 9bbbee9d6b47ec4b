"""The group (author) ε of a post-level run, against references that share no code with it."""

from __future__ import annotations

import math

import pytest
from scipy.optimize import brentq
from scipy.stats import norm

from fedpriv.privacy.group_privacy import group_epsilon, mixture_event


def gaussian_epsilon(mu: float, delta: float) -> float:
    """Exact ε of a Gaussian mechanism with sensitivity/σ = mu (Balle & Wang 2018, Theorem 8)."""
    def excess(eps: float) -> float:
        return norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * norm.cdf(-eps / mu - mu / 2) - delta
    return brentq(excess, 0.0, 500.0)


def poisson_gaussian_epsilon(sigma: float, q: float, steps: int, delta: float) -> float:
    """dp_accounting's own PLD of the Poisson-subsampled Gaussian (the post-level mechanism)."""
    import dp_accounting
    from dp_accounting.pld import pld_privacy_accountant

    acc = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-3)
    acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)
    return acc.get_epsilon(delta)


def test_a_group_of_one_is_the_post_level_epsilon():
    expected = poisson_gaussian_epsilon(1.1, 0.05, 40, 1e-5)
    assert group_epsilon([(1.1, 0.05, 40)], 1e-5, 1) == pytest.approx(expected, rel=2e-3)


@pytest.mark.parametrize("k", [2, 5])
def test_without_sampling_a_group_of_k_is_a_gaussian_of_sensitivity_k(k):
    sigma, steps, delta = 4.0, 10, 1e-5
    expected = gaussian_epsilon(k * math.sqrt(steps) / sigma, delta)  # q = 1: all k posts in every step
    assert group_epsilon([(sigma, 1.0, steps)], delta, k) == pytest.approx(expected, rel=5e-3)


def test_group_epsilon_grows_with_the_group():
    history, delta = [(1.0, 0.07, 20), (1.0, 0.07, 10)], 1e-5
    post = group_epsilon(history, delta, 1)
    values = [group_epsilon(history, delta, k) for k in (1, 3, 7)]
    assert values == sorted(values) and values[0] == pytest.approx(post)
    assert values[1] > post * 1.5 and math.isfinite(values[2])


def test_no_noise_means_no_guarantee_and_no_steps_means_no_loss():
    assert group_epsilon([(0.0, 0.1, 5)], 1e-5, 3) == math.inf
    assert group_epsilon([(1.0, 0.1, 0)], 1e-5, 3) == 0.0


def test_the_mixture_is_a_distribution_over_0_to_k_posts_sampled():
    event = mixture_event(1.0, 0.3, 6)
    assert event.sensitivities[0] == 0.0 and max(event.sensitivities) <= 6
    assert sum(event.sampling_probs) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        mixture_event(1.0, 0.3, 0)


def test_an_epsilon_search_that_overflows_falls_back_to_searching_delta():
    """dp_accounting's ε(δ) returns ∞ for this finite PLD (a 23-post author, the default split's ap-south)."""
    history = [(1.1376953125, 0.125, 128)]
    eps = group_epsilon(history, 1e-5, 23)
    assert math.isfinite(eps)
    assert group_epsilon(history, 1e-5, 17) < eps < group_epsilon(history, 1e-5, 41)
