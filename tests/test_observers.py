import pytest
import torch

from ptq.quant.functional import channel_view, fake_quantize, qparams_from_range, sqnr_db
from ptq.quant.observers import LpObserver, MinMaxObserver, PercentileObserver, PerChannel, PerTensor, lp_search


def _lp_search_loop(x, bits, p, n):
    """Reference: one channel and one candidate at a time."""
    los, his = [], []
    for row in x:
        best = None
        for i in range(n):
            a = 1 - i / n
            s, z = qparams_from_range(a * row.min(), a * row.max(), bits, False)
            err = (fake_quantize(row, s, z, bits) - row).abs().pow(p).sum()
            if best is None or err < best[0]:
                best = (err, a)
        los.append(best[1] * row.min())
        his.append(best[1] * row.max())
    return torch.stack(los), torch.stack(his)


def test_vectorised_lp_search_matches_per_channel_loop():
    torch.manual_seed(0)
    x = torch.randn(6, 300) * torch.linspace(0.1, 3, 6).view(-1, 1)
    x[0, 0] = 25.0  # an outlier that the search should clip
    lo, hi = lp_search(x, x.amin(1), x.amax(1), 4, False, p=2.4, num_candidates=50, max_elements=1000)
    ref_lo, ref_hi = _lp_search_loop(x, 4, 2.4, 50)
    assert torch.allclose(lo, ref_lo) and torch.allclose(hi, ref_hi)
    assert hi[0] < 25.0


def test_lp_beats_minmax_on_heavy_tails():
    torch.manual_seed(0)
    x = torch.distributions.Laplace(0.0, 1.0).sample((20000,))
    results = {}
    for name, obs in {"minmax": MinMaxObserver(), "lp": LpObserver()}.items():
        obs.observe(x)
        s, z = obs.calculate_qparams(4, False)
        results[name] = sqnr_db(x, fake_quantize(x, s, z, 4))
    assert results["lp"] > results["minmax"] + 2


def test_per_channel_beats_per_tensor():
    torch.manual_seed(0)
    w = torch.randn(32, 16, 3, 3) * torch.logspace(-2, 0, 32).view(-1, 1, 1, 1)
    out = {}
    for name, gran in {"tensor": PerTensor(), "channel": PerChannel(0)}.items():
        obs = LpObserver(gran)
        obs.observe(w)
        s, z = obs.calculate_qparams(4, False)
        out[name] = sqnr_db(w, fake_quantize(w, channel_view(s, 4), channel_view(z, 4), 4))
    assert out["channel"] > out["tensor"] + 6


def test_observer_accumulates_over_batches_and_bounds_memory():
    obs = MinMaxObserver(max_samples=1000)
    for i in range(20):
        obs.observe(torch.full((5000,), float(i)))
    assert obs.lo.item() == 0 and obs.hi.item() == 19
    assert obs.samples.shape[1] == 1000


def test_percentile_clips_outliers():
    x = torch.cat([torch.rand(100000), torch.tensor([1000.0])])
    obs = PercentileObserver(percentile=99.9)
    obs.observe(x)
    lo, hi = obs.calculate_range(8, False)
    assert hi < 2.0 and lo >= 0


def test_empty_observer_and_bad_settings_error():
    with pytest.raises(RuntimeError, match="recorded nothing"):
        MinMaxObserver().calculate_qparams(8, False)
    with pytest.raises(ValueError):
        PercentileObserver(percentile=10)
    with pytest.raises(ValueError):
        LpObserver(p=0)
