"""Interpolants, time sampling and the REPA loss against closed forms and hand computations."""

import math

import pytest
import torch
import torch.nn.functional as F

from loss import Interpolant, REPALoss, alignment_loss, sample_time


@pytest.mark.parametrize("path_type", ["linear", "cosine"])
def test_derivatives_match_finite_differences(path_type):
    t = torch.linspace(0.01, 0.99, 50, dtype=torch.float64)
    h = 1e-6
    interp = Interpolant(path_type)
    alpha, sigma, d_alpha, d_sigma = interp.coefficients(t)
    a_plus, s_plus, _, _ = interp.coefficients(t + h)
    a_minus, s_minus, _, _ = interp.coefficients(t - h)
    torch.testing.assert_close(d_alpha, (a_plus - a_minus) / (2 * h), rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(d_sigma, (s_plus - s_minus) / (2 * h), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("path_type", ["linear", "cosine"])
def test_endpoints_are_data_and_noise(path_type):
    gen = torch.Generator().manual_seed(0)
    x, eps = (
        torch.randn(2, 3, generator=gen, dtype=torch.float64),
        torch.randn(2, 3, generator=gen, dtype=torch.float64),
    )
    interp = Interpolant(path_type)
    zero, one = torch.tensor(0.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64)
    torch.testing.assert_close(interp.interpolate(x, eps, zero)[0], x, atol=1e-12, rtol=0)
    torch.testing.assert_close(interp.interpolate(x, eps, one)[0], eps, atol=1e-12, rtol=0)


def test_closed_form_values():
    x, eps, t = torch.tensor([2.0]), torch.tensor([-1.0]), torch.tensor([0.25])
    x_t, v = Interpolant("linear").interpolate(x, eps, t)
    assert x_t.item() == pytest.approx(0.75 * 2 - 0.25) and v.item() == pytest.approx(-3.0)
    x_t, v = Interpolant("cosine").interpolate(x, eps, t)
    c, s = math.cos(math.pi / 8), math.sin(math.pi / 8)
    assert x_t.item() == pytest.approx(2 * c - s, rel=1e-6)
    assert v.item() == pytest.approx(-math.pi / 2 * (2 * s + c), rel=1e-6)


@pytest.mark.parametrize("path_type", ["linear", "cosine"])
def test_score_from_velocity_on_gaussian_data(path_type):
    # Data N(0, s^2): x_t ~ N(0, alpha^2 s^2 + sigma^2), true score -x_t / var. The exact velocity is
    # E[v | x_t] = (alpha' alpha s^2 + sigma' sigma) / var * x_t, so the conversion must give the score.
    s2 = 0.3
    t = torch.tensor([0.2, 0.5, 0.8], dtype=torch.float64)
    interp = Interpolant(path_type)
    alpha, sigma, d_alpha, d_sigma = interp.coefficients(t)
    var = alpha**2 * s2 + sigma**2
    x_t = torch.tensor([0.7, -1.2, 2.0], dtype=torch.float64)
    v = (d_alpha * alpha * s2 + d_sigma * sigma) / var * x_t
    torch.testing.assert_close(interp.score_from_velocity(v, x_t, t), -x_t / var)


def test_unknown_names_are_refused():
    with pytest.raises(ValueError, match="path_type 'edm'"):
        Interpolant("edm")
    with pytest.raises(ValueError, match="weighting 'cubic'"):
        sample_time(4, "cubic")
    with pytest.raises(ValueError, match="prediction"):
        REPALoss(prediction="eps")


@pytest.mark.parametrize("path_type", ["linear", "cosine"])
def test_lognormal_time_has_lognormal_noise_ratio(path_type):
    # The noise-to-signal ratio at t must be exp(n), n ~ N(0, 1): its log has mean 0 and std 1.
    gen = torch.Generator().manual_seed(0)
    t = sample_time(200_000, "lognormal", path_type, generator=gen).double()
    alpha, sigma, _, _ = Interpolant(path_type).coefficients(t)
    log_ratio = torch.log(sigma / alpha)
    assert log_ratio.mean().item() == pytest.approx(0.0, abs=0.01)
    assert log_ratio.std().item() == pytest.approx(1.0, abs=0.01)
    u = sample_time(200_000, "uniform", generator=gen)
    assert 0 <= u.min() and u.max() < 1 and u.mean().item() == pytest.approx(0.5, abs=0.005)


# The path's noise-to-signal ratio sigma(t) / alpha(t), written out: linear t / (1 - t), cosine tan(pi t / 2).
LOG_NOISE_RATIO = {"linear": torch.logit, "cosine": lambda t: torch.log(torch.tan(math.pi / 2 * t))}
MEDIAN_TIME = {"linear": torch.sigmoid, "cosine": lambda m: 2 / math.pi * torch.atan(torch.exp(m))}


@pytest.mark.parametrize("p_mean, p_std", [(-1.2, 1.0), (0.8, 1.6)])
@pytest.mark.parametrize("path_type", ["linear", "cosine"])
def test_lognormal_time_with_shifted_mean_matches_closed_form(path_type, p_mean, p_std):
    # EDM-style: log sigma ~ N(p_mean, p_std^2), and t is where the path's noise-to-signal ratio equals sigma:
    # logit(t) = log sigma (linear), tan(pi t / 2) = sigma (cosine). p_mean != 0 makes the law asymmetric in
    # t <-> 1 - t, so a reversed map (e.g. t = 1 / (1 + sigma)) flips the sign of the shift and fails here.
    gen = torch.Generator().manual_seed(0)
    t = sample_time(200_000, "lognormal", path_type, generator=gen, p_mean=p_mean, p_std=p_std).double()
    log_sigma = LOG_NOISE_RATIO[path_type](t)
    assert log_sigma.mean().item() == pytest.approx(p_mean, abs=0.01 * p_std)  # standard error 0.0022 p_std
    assert log_sigma.std().item() == pytest.approx(p_std, rel=0.01)
    # The sign of the shift, in t itself: P(t < 1/2) = P(log sigma < 0) = Phi(-p_mean / p_std), and the
    # median time is where sigma = exp(p_mean).
    below_half = 0.5 * math.erfc(p_mean / (p_std * math.sqrt(2)))
    assert (t < 0.5).double().mean().item() == pytest.approx(below_half, abs=0.005)
    median = MEDIAN_TIME[path_type](torch.tensor(p_mean, dtype=torch.float64)).item()
    assert t.median().item() == pytest.approx(median, abs=0.005)
    assert (median < 0.5) == (p_mean < 0)


def test_alignment_loss_against_hand_computation():
    torch.manual_seed(0)
    z1, t1 = torch.randn(3, 5, 8), torch.randn(3, 5, 8)
    z2, t2 = torch.randn(3, 5, 4), torch.randn(3, 5, 4)
    # Official form: loop over encoders and samples, mean over tokens, divide by encoders x batch.
    expected = 0.0
    for z, target in [(z1, t1), (z2, t2)]:
        for n in range(3):
            cos = [F.cosine_similarity(z[n, k], target[n, k], dim=0) for k in range(5)]
            expected += -torch.stack(cos).mean()
    expected /= 2 * 3
    torch.testing.assert_close(alignment_loss([z1, z2], [t1, t2]), expected)
    # Perfect alignment (up to positive scale) reaches -1, opposition +1.
    assert alignment_loss([z1], [3 * z1]).item() == pytest.approx(-1.0)
    assert alignment_loss([z1], [-z1]).item() == pytest.approx(1.0)


def test_alignment_loss_shape_errors():
    with pytest.raises(ValueError, match="does not match target"):
        alignment_loss([torch.zeros(2, 16, 8)], [torch.zeros(2, 64, 8)])
    with pytest.raises(ValueError, match="1 projector outputs but 2"):
        alignment_loss([torch.zeros(2, 4, 8)], [torch.zeros(2, 4, 8)] * 2)


class LinearModel(torch.nn.Module):
    """v = a * x_t (per-sample scalar), zs = fixed tokens: lets the loss be computed by hand."""

    def forward(self, x_t, t, y):
        self.seen = (x_t, t, y)
        return 0.5 * x_t, [x_t.flatten(2).transpose(1, 2)]  # tokens (N, H*W, C)


@pytest.mark.parametrize("path_type", ["linear", "cosine"])
def test_repa_loss_against_hand_computation(path_type):
    x = torch.randn(4, 3, 2, 2)
    y = torch.arange(4)
    target = [torch.randn(4, 4, 3)]
    loss = REPALoss(path_type=path_type, weighting="uniform", proj_coeff=0.5)
    model = LinearModel()
    terms = loss(model, x, y, target, generator=torch.Generator().manual_seed(3))
    # Redraw the same t and noise and compute everything by hand.
    gen = torch.Generator().manual_seed(3)
    t = torch.rand(4, generator=gen)
    noise = torch.randn(x.shape, generator=gen)
    alpha, sigma, d_alpha, d_sigma = Interpolant(path_type).coefficients(t.view(-1, 1, 1, 1))
    x_t = alpha * x + sigma * noise
    torch.testing.assert_close(model.seen[0], x_t)
    torch.testing.assert_close(model.seen[1], t)
    denoising = ((0.5 * x_t - (d_alpha * x + d_sigma * noise)) ** 2).mean(dim=(1, 2, 3))
    proj = -F.cosine_similarity(x_t.flatten(2).transpose(1, 2), target[0], dim=-1).mean()
    torch.testing.assert_close(terms.denoising, denoising)
    torch.testing.assert_close(terms.proj, proj)
    torch.testing.assert_close(terms.total, denoising.mean() + 0.5 * proj)


def test_repa_loss_without_targets_is_flow_matching_only():
    x = torch.randn(2, 3, 2, 2)
    terms = REPALoss(proj_coeff=0.5)(LinearModel(), x, torch.arange(2))
    assert terms.proj.item() == 0.0
    torch.testing.assert_close(terms.total, terms.denoising.mean())
