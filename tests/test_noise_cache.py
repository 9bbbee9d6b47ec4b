"""σ for a target ε is cached in-process and on disk, and a cached σ is re-checked before use."""

from __future__ import annotations

import json

import pytest

from fedpriv.privacy import noise

TARGET, DELTA, STEPS, Q = 4.0, 1e-5, 20, 0.1


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDPRIV_CACHE_DIR", str(tmp_path))
    noise._memoised.cache_clear()
    yield tmp_path / noise.CACHE_NAME
    noise._memoised.cache_clear()


def _independent_epsilon(sigma: float, accountant: str = "rdp") -> float:
    """ε of the schedule from dp_accounting directly (RDP or PLD), not through fedpriv's accountant."""
    import dp_accounting
    from dp_accounting.pld import PLDAccountant
    from dp_accounting.rdp import RdpAccountant

    acc = PLDAccountant() if accountant == "pld" else RdpAccountant()
    acc.compose(dp_accounting.PoissonSampledDpEvent(Q, dp_accounting.GaussianDpEvent(sigma)), STEPS)
    return acc.get_epsilon(DELTA)


def test_answer_is_persisted_and_reused_without_a_new_search(cache, monkeypatch):
    sigma = noise.noise_multiplier_for(TARGET, DELTA, STEPS, Q)
    assert TARGET - 0.1 < _independent_epsilon(sigma) <= TARGET + 0.05
    assert list(json.loads(cache.read_text()).values()) == [sigma]

    noise._memoised.cache_clear()  # a fresh process: only the file remains
    monkeypatch.setattr(noise, "_search", lambda *a: pytest.fail("searched again despite a valid cache entry"))
    assert noise.noise_multiplier_for(TARGET, DELTA, STEPS, Q) == sigma


def test_an_edited_cache_entry_that_would_overspend_is_recomputed(cache):
    sigma = noise.noise_multiplier_for(TARGET, DELTA, STEPS, Q)
    key = next(iter(json.loads(cache.read_text())))
    cache.write_text(json.dumps({key: sigma / 3}))  # too little noise: ε far above target
    noise._memoised.cache_clear()

    assert noise.noise_multiplier_for(TARGET, DELTA, STEPS, Q) == pytest.approx(sigma)
    assert json.loads(cache.read_text())[key] == pytest.approx(sigma)


def test_different_questions_get_different_answers(cache):
    loose = noise.noise_multiplier_for(8.0, DELTA, STEPS, Q)
    tight = noise.noise_multiplier_for(TARGET, DELTA, STEPS, Q)
    assert tight > loose
    assert len(json.loads(cache.read_text())) == 2


def test_an_unwritable_cache_does_not_stop_training(tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    monkeypatch.setenv("FEDPRIV_CACHE_DIR", str(blocker))
    noise._memoised.cache_clear()
    try:
        assert noise.noise_multiplier_for(TARGET, DELTA, STEPS, Q) > 0
    finally:
        noise._memoised.cache_clear()


def test_pld_search_meets_the_target_is_cached_and_rechecked(cache, monkeypatch):
    sigma = noise.noise_multiplier_for(TARGET, DELTA, STEPS, Q, "pld")
    assert TARGET - 0.02 < _independent_epsilon(sigma, "pld") <= TARGET  # within the search tolerance, never above
    assert sigma < noise.noise_multiplier_for(TARGET, DELTA, STEPS, Q, "rdp")  # tighter: less noise for the same ε
    key = next(k for k in json.loads(cache.read_text()) if "'pld'" in k)
    assert "dp_accounting=" in key  # the answer depends on the library that computed it

    noise._memoised.cache_clear()  # a fresh process: the file answers, no new search
    with monkeypatch.context() as m:
        m.setattr(noise, "_search", lambda *a: pytest.fail("searched again despite a valid cache entry"))
        assert noise.noise_multiplier_for(TARGET, DELTA, STEPS, Q, "pld") == sigma

    data = json.loads(cache.read_text())
    data[key] = sigma * 0.9  # an edited entry that would overspend
    cache.write_text(json.dumps(data))
    noise._memoised.cache_clear()
    assert noise.noise_multiplier_for(TARGET, DELTA, STEPS, Q, "pld") == pytest.approx(sigma)
    assert json.loads(cache.read_text())[key] == pytest.approx(sigma)  # and the file is repaired


def test_pld_target_out_of_reach_is_a_config_error(cache):
    from fedpriv.core.errors import ConfigError

    with pytest.raises(ConfigError, match="too small to reach"):
        noise.noise_multiplier_for(1e-9, DELTA, 1000, 1.0, "pld")
