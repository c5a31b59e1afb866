"""Gaussian diffusion: closed forms, the hybrid loss, respacing, and DDPM/DDIM sampling of Gaussian data."""

import math

import pytest
import torch

from diffusion import (
    DiffusionLoss,
    GaussianDiffusion,
    ddim_sampler,
    ddpm_sampler,
    discretized_gaussian_log_likelihood,
    space_timesteps,
)
from models.dit import DiT

DIFF = GaussianDiffusion.linear()


def abar_by_hand(t):
    return math.prod(1 - (1e-4 + (0.02 - 1e-4) * s / 999) for s in range(t + 1))


def test_linear_schedule_and_q_sample_closed_form():
    assert DIFF.num_timesteps == 1000
    assert DIFF.betas[0].item() == pytest.approx(1e-4) and DIFF.betas[-1].item() == pytest.approx(0.02)
    t = torch.tensor([0, 1, 250, 999])
    x0, noise = torch.randn(4, 3, 2, 2, dtype=torch.float64), torch.randn(4, 3, 2, 2, dtype=torch.float64)
    abar = torch.tensor([abar_by_hand(s) for s in t.tolist()], dtype=torch.float64).view(-1, 1, 1, 1)
    torch.testing.assert_close(DIFF.q_sample(x0, t, noise), abar.sqrt() * x0 + (1 - abar).sqrt() * noise)
    assert abar_by_hand(999) == pytest.approx(4.04e-5, rel=0.01)  # x_999 is noise up to 0.6% of x_0


@pytest.mark.parametrize("t", [1, 10, 500, 999])
def test_posterior_is_bayes_rule(t):
    # q(x_{t-1} | x_t, x_0) ∝ N(x_t; sqrt(alpha_t) x_{t-1}, beta_t) N(x_{t-1}; sqrt(abar_{t-1}) x_0, 1 - abar_{t-1}):
    # a product of Gaussians in x_{t-1}, whose precision and mean are added and weighted by hand here.
    beta, abar_prev = DIFF.betas[t].item(), abar_by_hand(t - 1)
    precision = (1 - beta) / beta + 1 / (1 - abar_prev)
    x0, x_t = torch.randn(2, 1, 3, 3, dtype=torch.float64), torch.randn(2, 1, 3, 3, dtype=torch.float64)
    mean_bayes = (math.sqrt(1 - beta) / beta * x_t + math.sqrt(abar_prev) / (1 - abar_prev) * x0) / precision
    mean, var, log_var = DIFF.q_posterior(x0, x_t, torch.full((2,), t))
    torch.testing.assert_close(mean, mean_bayes)
    assert var.flatten()[0].item() == pytest.approx(1 / precision, rel=1e-10)
    assert log_var.flatten()[0].item() == pytest.approx(math.log(1 / precision), rel=1e-10)


def test_posterior_at_t0_is_x0_with_clipped_log_variance():
    x0, x_t = torch.randn(1, 1, 2, 2, dtype=torch.float64), torch.randn(1, 1, 2, 2, dtype=torch.float64)
    mean, var, log_var = DIFF.q_posterior(x0, x_t, torch.zeros(1, dtype=torch.long))
    torch.testing.assert_close(mean, x0)
    assert var.item() == 0 and log_var.item() == pytest.approx(math.log(DIFF.posterior_variance[1].item()))


def test_learned_range_endpoints_and_eps_mean():
    # v = -1 gives beta_tilde_t, v = +1 gives beta_t; the mean is DDPM's Eq. 11: (x_t - beta/sqrt(1-abar) eps)/sqrt(alpha).
    t = torch.tensor([10, 700])
    x_t, eps = torch.randn(2, 2, 2, 2, dtype=torch.float64), torch.randn(2, 2, 2, 2, dtype=torch.float64)
    for v, expected in [(-1.0, DIFF.posterior_variance[t]), (1.0, DIFF.betas[t]), (0.0, None)]:
        out = torch.cat([eps, torch.full_like(eps, v)], dim=1)
        mean, log_var, _ = DIFF.p_mean_variance(out, x_t, t)
        if expected is None:  # the midpoint is the geometric mean
            expected = (DIFF.posterior_variance[t] * DIFF.betas[t]).sqrt()
        torch.testing.assert_close(log_var[:, 0, 0, 0], expected.log())
    beta, abar = DIFF.betas[t].view(-1, 1, 1, 1), DIFF.alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(mean, (x_t - beta / (1 - abar).sqrt() * eps) / (1 - beta).sqrt())


def test_vb_term_vanishes_for_the_true_posterior_only():
    gen = torch.Generator().manual_seed(0)
    x0, noise = (
        torch.randn(6, 4, 4, 4, generator=gen, dtype=torch.float64),
        torch.randn(6, 4, 4, 4, generator=gen, dtype=torch.float64),
    )
    t = torch.tensor([1, 2, 50, 400, 800, 999])
    x_t = DIFF.q_sample(x0, t, noise)
    # eps = the true noise gives x0_hat = x0 (the true posterior mean); v = -1 gives its variance beta_tilde.
    exact = torch.cat([noise, -torch.ones_like(noise)], dim=1)
    assert DIFF.vb_terms_bpd(exact, x0, x_t, t).abs().max() < 1e-9
    # Any other mean or variance costs bits, matching the KL of torch.distributions (nats -> bits per dim).
    wrong_mean, wrong_var = torch.cat([noise + 0.1, -torch.ones_like(noise)], 1), torch.zeros_like(exact)
    for wrong in (wrong_mean, torch.cat([noise, wrong_var[:, :4]], 1)):
        vb = DIFF.vb_terms_bpd(wrong, x0, x_t, t)
        mean, log_var, _ = DIFF.p_mean_variance(wrong, x_t, t)
        true_mean, true_var, _ = DIFF.q_posterior(x0, x_t, t)
        kl = torch.distributions.kl_divergence(
            torch.distributions.Normal(true_mean, true_var.sqrt().expand_as(x0)),
            torch.distributions.Normal(mean, (0.5 * log_var).exp()),
        )
        torch.testing.assert_close(vb, kl.flatten(1).mean(1) / math.log(2))
        # vs < 1e-9 for the exact output. For large t beta_tilde_t ≈ beta_t, so only small t see the variance.
        assert (vb[:3] > 1e-5).all()


def test_decoder_nll_at_t0():
    # At t = 0 the VLB term is -log2 of the probability of x_0's bin of width 2/255 (tails at -1 and 1).
    x0 = torch.tensor([-1.0, -0.5, 0.0, 1 / 255 * 3, 1.0], dtype=torch.float64).view(1, 5, 1, 1)
    mean, log_scale = x0 + 0.004, torch.full_like(x0, math.log(0.01))
    normal = torch.distributions.Normal(mean, 0.01)
    prob_bin = normal.cdf(x0 + 1 / 255) - normal.cdf(x0 - 1 / 255)
    prob = torch.where(
        x0 < -0.999, normal.cdf(x0 + 1 / 255), torch.where(x0 > 0.999, 1 - normal.cdf(x0 - 1 / 255), prob_bin)
    )
    torch.testing.assert_close(discretized_gaussian_log_likelihood(x0, mean, log_scale), prob.log())
    # Through vb_terms_bpd: x0_hat = x0 at t = 0 when eps is the true noise.
    noise = torch.randn_like(x0)
    t = torch.zeros(1, dtype=torch.long)
    x_t = DIFF.q_sample(x0, t, noise)
    out = torch.cat([noise, -torch.ones_like(noise)], dim=1)
    std = DIFF.posterior_variance[1].sqrt()  # the clipped variance floor
    normal = torch.distributions.Normal(x0, std)
    prob_bin = normal.cdf(x0 + 1 / 255) - normal.cdf(x0 - 1 / 255)
    prob = torch.where(
        x0 < -0.999, normal.cdf(x0 + 1 / 255), torch.where(x0 > 0.999, 1 - normal.cdf(x0 - 1 / 255), prob_bin)
    )
    torch.testing.assert_close(DIFF.vb_terms_bpd(out, x0, x_t, t), -prob.log().mean().view(1) / math.log(2))


def test_hybrid_loss_stop_gradient_splits_the_channels():
    gen = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(3, 2, 2, 2, generator=gen), torch.randn(3, 2, 2, 2, generator=gen)
    t = torch.tensor([0, 300, 999])
    x_t = DIFF.q_sample(x0, t, noise)
    out = torch.randn(3, 4, 2, 2, generator=gen).clamp(-1, 1).requires_grad_()
    mse, vb = DIFF.training_losses(out, x0, x_t, noise, t)
    torch.testing.assert_close(mse, (out[:, :2] - noise).pow(2).mean((1, 2, 3)))
    (grad_vb,) = torch.autograd.grad(vb.sum(), out, retain_graph=True)
    (grad_mse,) = torch.autograd.grad(mse.sum(), out)
    assert grad_vb[:, :2].abs().max() == 0 and grad_vb[:, 2:].abs().min(dim=1).values.gt(0).any()  # vb: variance only
    assert grad_mse[:, 2:].abs().max() == 0 and grad_mse[:, :2].abs().sum() > 0  # mse: eps only


class FixedOutput(torch.nn.Module):
    """A model whose output is a fixed function of its inputs, and whose zs are its input tokens."""

    def forward(self, x_t, t, y):
        self.seen = (x_t, t, y)
        return torch.cat([0.5 * x_t, torch.tanh(x_t)], dim=1), [x_t.flatten(2).transpose(1, 2)]


def test_diffusion_loss_against_hand_computation():
    x, y, target = torch.randn(4, 3, 2, 2), torch.arange(4), [torch.randn(4, 4, 3)]
    model = FixedOutput()
    terms = DiffusionLoss(proj_coeff=0.5)(model, x, y, target, generator=torch.Generator().manual_seed(3))
    # Redraw the same timesteps and noise.
    gen = torch.Generator().manual_seed(3)
    t = torch.randint(0, 1000, (4,), generator=gen)
    noise = torch.randn(x.shape, generator=gen)
    x_t = DIFF.q_sample(x, t, noise)
    torch.testing.assert_close(model.seen[0], x_t)
    assert model.seen[1].dtype == torch.long and torch.equal(model.seen[1], t)
    mse, vb = DIFF.training_losses(torch.cat([0.5 * x_t, torch.tanh(x_t)], 1), x, x_t, noise, t)
    proj = -torch.nn.functional.cosine_similarity(x_t.flatten(2).transpose(1, 2), target[0], dim=-1).mean()
    torch.testing.assert_close(terms.denoising, mse + vb)
    torch.testing.assert_close(terms.proj, proj)
    torch.testing.assert_close(terms.total, (mse + vb).mean() + 0.5 * proj)
    assert (vb > 0).all() and (mse > 0).all()
    no_repa = DiffusionLoss()(model, x, y)
    assert no_repa.proj.item() == 0 and torch.equal(no_repa.total, no_repa.denoising.mean())


def test_respacing_keeps_abar_and_recomputes_betas():
    steps = space_timesteps(1000, 250)
    assert len(steps) == 250 and steps[:4] == [0, 4, 8, 12] and steps[-2:] == [995, 999]
    spaced = DIFF.respace(steps)
    assert spaced.timestep_map.tolist() == steps and spaced.original_num_timesteps == 1000
    # q(x_t | x_0) is unchanged at every kept step: the new alphas multiply up to the old abar.
    torch.testing.assert_close(spaced.alphas_cumprod, DIFF.alphas_cumprod[steps], rtol=1e-12, atol=0)
    # By hand: the first new beta is beta_0, the next one spans steps 1..4.
    assert spaced.betas[0].item() == pytest.approx(1e-4, rel=1e-12)
    assert spaced.betas[1].item() == pytest.approx(1 - abar_by_hand(4) / abar_by_hand(0), rel=1e-9)
    assert spaced.betas[1].item() == pytest.approx(DIFF.betas[1:5].sum().item(), rel=1e-3)  # ≈ sum of 4 betas
    torch.testing.assert_close(DIFF.respace(range(1000)).betas, DIFF.betas, rtol=1e-9, atol=0)
    twice = DIFF.respace(range(0, 1000, 2)).respace([0, 499])  # composes: index 499 of the first is step 998
    assert twice.timestep_map.tolist() == [0, 998]
    assert twice.betas[1].item() == pytest.approx(1 - abar_by_hand(998) / abar_by_hand(0), rel=1e-9)
    with pytest.raises(ValueError, match="num_steps must lie in 2..1000, got 1001"):
        space_timesteps(1000, 1001)
    with pytest.raises(ValueError, match="0..999"):
        DIFF.respace([0, 1000])


class GaussianEps(torch.nn.Module):
    """Exact [eps | v] for data x ~ N(mu_y, s^2 I), given the (respaced) process the sampler will use.

    x_t = a x + b eps (a^2 = abar, b^2 = 1 - abar): E[eps | x_t] = b (x_t - a mu) / (a^2 s^2 + b^2). The exact
    reverse step of the respaced process has variance beta_tilde + c1^2 Var[x_0 | x_t] with
    Var[x_0 | x_t] = s^2 b^2 / (a^2 s^2 + b^2), which lies in [beta_tilde, beta] for s <= 1, so v represents it.
    """

    def __init__(self, means, s, process):
        super().__init__()
        self.means, self.s, self.process = means, s, process  # means: (num_classes + 1, C)
        self.num_classes = means.shape[0] - 1
        self.index = torch.full((process.original_num_timesteps,), -1)  # original timestep -> step index
        self.index[process.timestep_map] = torch.arange(process.num_timesteps)
        self.calls = []

    def forward(self, x, t, y):
        self.calls.append((x.shape[0], int(t[0]), y.clone()))
        p, i = self.process, self.index[t]
        view = lambda v: v[i].view(-1, 1, 1, 1)
        abar, beta, beta_tilde = view(p.alphas_cumprod), view(p.betas), view(p.posterior_variance)
        a, b2, mu = abar.sqrt(), 1 - abar, self.means[y].to(torch.float64)[:, :, None, None]
        var_t = a**2 * self.s**2 + b2
        eps = b2.sqrt() * (x.double() - a * mu) / var_t
        step_var = beta_tilde + view(p.posterior_mean_coef1) ** 2 * self.s**2 * b2 / var_t
        frac = (step_var.log() - beta_tilde.clamp(min=1e-30).log()) / (beta.log() - beta_tilde.clamp(min=1e-30).log())
        return torch.cat([eps, (2 * frac - 1).expand_as(eps)], dim=1).to(x.dtype), []


def test_ddpm_with_exact_model_reaches_the_data_distribution():
    # Few respaced steps on purpose: the exact kernel is exact for any spacing, while a wrong variance (here v
    # pinned at -1 or +1) misses s^2 by 40%; with 250 steps every variance in [beta_tilde, beta] is within 7%.
    gen = torch.Generator().manual_seed(0)
    s, means = 0.5, torch.tensor([[1.0, -2.0], [0.0, 0.0]], dtype=torch.float64)
    exact = GaussianEps(means, s, DIFF.respace(space_timesteps(1000, 10)))
    x_T = torch.randn(2048, 2, 2, 2, generator=gen, dtype=torch.float64)
    y = torch.zeros(2048, dtype=torch.long)
    variance_ratio = {}
    for v in (None, -1.0, 1.0):
        model = (
            exact
            if v is None
            else (lambda x, t, y, v=v: (exact(x, t, y)[0].index_fill(1, torch.tensor([2, 3]), v), []))
        )
        x0 = ddpm_sampler(model, x_T, y, num_steps=10, generator=torch.Generator().manual_seed(1))
        per_channel = x0.transpose(0, 1).flatten(1)  # (C, N*H*W)
        torch.testing.assert_close(per_channel.mean(1), means[0], atol=0.02, rtol=0)  # the mean needs eps only
        variance_ratio[v] = per_channel.var(1) / s**2
    torch.testing.assert_close(variance_ratio[None], torch.ones(2, dtype=torch.float64), rtol=0, atol=0.05)
    assert (variance_ratio[-1.0] < 0.6).all() and (variance_ratio[1.0] > 1.3).all()


def test_ddim_maps_noise_deterministically_onto_the_data():
    # With eta = 0 and the exact eps, DDIM integrates the probability-flow ODE, whose map from x_999 ~
    # N(a mu, a^2 s^2 + b^2) to N(mu, s^2) is affine: x_0 = mu + s (x_T - a mu) / sqrt(a^2 s^2 + b^2) ≈ mu + s x_T.
    s, means = 0.5, torch.tensor([[1.0, -2.0], [0.0, 0.0]], dtype=torch.float64)
    x_T = torch.linspace(-3, 3, 16, dtype=torch.float64).view(2, 2, 2, 2)
    y = torch.zeros(2, dtype=torch.long)
    abar_T = DIFF.alphas_cumprod[-1].item()
    mu = means[0].view(1, 2, 1, 1)
    exact = mu + s * (x_T - math.sqrt(abar_T) * mu) / math.sqrt(abar_T * s**2 + 1 - abar_T)
    errors = []
    for n in (25, 50, 100, 200):
        model = GaussianEps(means, s, DIFF.respace(space_timesteps(1000, n)))
        errors.append((ddim_sampler(model, x_T, y, num_steps=n) - exact).abs().max().item())
    # DDIM is Euler on the ODE in (x / sqrt(abar), sqrt(1/abar - 1)): first order, the error halves per doubling.
    assert errors[-1] < 0.03 and all(1.7 < errors[i] / errors[i + 1] < 2.3 for i in range(3)), errors
    torch.testing.assert_close(ddim_sampler(model, x_T, y, num_steps=200), mu + s * x_T, atol=0.05, rtol=0)


class AffineEps(torch.nn.Module):
    """eps-only output (C channels) eps = 0.3 x + 0.1 t, known in closed form; records the states it sees."""

    def __init__(self):
        super().__init__()
        self.states = []

    def forward(self, x, t, y):
        self.states.append(x.clone())
        return 0.3 * x + 0.1 * t.double().view(-1, 1, 1, 1), []


@pytest.mark.parametrize("eta", [0.7, 1.0])
def test_ddim_step_with_eta_against_song_et_al(eta):
    # A 3-step process with betas 0.1, 0.3, 0.5: abar = 0.9, 0.63, 0.315 by hand. The first DDIM step goes
    # from timestep 2 (abar 0.315) to timestep 1 (abar_prev 0.63), and the model sees its result next.
    process = GaussianDiffusion(torch.tensor([0.1, 0.3, 0.5], dtype=torch.float64))
    abar, abar_prev = 0.9 * 0.7 * 0.5, 0.9 * 0.7
    gen = torch.Generator().manual_seed(0)
    x_T = torch.randn(4096, 1, 2, 2, generator=gen, dtype=torch.float64)
    model = AffineEps()
    y = torch.zeros(4096, dtype=torch.long)
    ddim_sampler(model, x_T, y, num_steps=3, eta=eta, diffusion=process, generator=torch.Generator().manual_seed(7))
    x_next = model.states[1]
    # Song et al. 2021, Eq. 12 and 16.
    eps = 0.3 * x_T + 0.1 * 2
    x0_pred = (x_T - math.sqrt(1 - abar) * eps) / math.sqrt(abar)
    sigma = eta * math.sqrt((1 - abar_prev) / (1 - abar)) * math.sqrt(1 - abar / abar_prev)
    mean = math.sqrt(abar_prev) * x0_pred + math.sqrt(1 - abar_prev - sigma**2) * eps
    assert 0.1 < sigma**2 < 1 - abar_prev - 0.05  # both the eps direction and the noise are sizeable here
    # The stochastic part: zero-mean noise of variance sigma^2, independent of x_T (16384 values).
    residual = (x_next - mean).flatten()
    assert residual.mean().item() == pytest.approx(0.0, abs=4 * sigma / math.sqrt(residual.numel()))
    assert residual.var().item() / sigma**2 == pytest.approx(1.0, abs=0.05)
    assert abs(torch.corrcoef(torch.stack([residual, x_T.flatten()]))[0, 1].item()) < 0.05
    # Exactly, with the injected noise: the step's noise is the generator's first draw.
    z = torch.randn(x_T.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    torch.testing.assert_close(x_next, mean + sigma * z, rtol=1e-10, atol=1e-10)
    if eta == 1.0:  # eta = 1 is the DDPM posterior variance beta_tilde of the step
        assert sigma**2 == pytest.approx(process.posterior_variance[2].item(), rel=1e-12)


def test_guidance_interval_in_normalised_time():
    means = torch.tensor([[1.0], [2.0], [-1.0]], dtype=torch.float64)  # 2 classes + null
    model = GaussianEps(means, 0.5, DIFF.respace(space_timesteps(1000, 10)))  # steps 999, 888, ..., 111, 0
    x_T, y = torch.randn(3, 1, 2, 2), torch.tensor([0, 1, 0])
    for sampler in (ddpm_sampler, ddim_sampler):
        model.calls.clear()
        sampler(model, x_T, y, num_steps=10, cfg_scale=2.0, guidance_low=0.0, guidance_high=0.7)
        for batch, timestep, labels in model.calls:
            if timestep / 1000 <= 0.7:
                assert batch == 6 and labels[3:].tolist() == [2, 2, 2]  # null class = num_classes
            else:
                assert batch == 3 and labels.tolist() == [0, 1, 0]
        assert [ts for b, ts, _ in model.calls if b == 6] == [666, 555, 444, 333, 222, 111, 0]


class LabelledOutput(torch.nn.Module):
    """eps and v depend on the label, so guidance and the choice of variance half are visible."""

    num_classes = 2

    def forward(self, x, t, y):
        yy = y.double().view(-1, 1, 1, 1)
        return torch.cat([0.3 * x + yy, (0.5 - yy / 2).expand_as(x)], dim=1), []


def test_ddpm_cfg_step_by_hand():
    # Two steps (timesteps 999 then 0), guided throughout: eps = e_u + w (e_c - e_u), v from the conditional.
    model, w = LabelledOutput(), 3.0
    x = torch.randn(2, 1, 2, 2, dtype=torch.float64)
    y = torch.zeros(2, dtype=torch.long)
    out = ddpm_sampler(model, x, y, num_steps=2, cfg_scale=w, generator=torch.Generator().manual_seed(5))
    spaced, noise = (
        DIFF.respace([0, 999]),
        torch.randn(x.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64),
    )
    for i, z in ((1, noise), (0, None)):
        e_c, e_u = 0.3 * x + 0, 0.3 * x + 2
        eps, v = e_u + w * (e_c - e_u), 0.5  # conditional v = 0.5 - 0/2
        beta, abar = spaced.betas[i].item(), spaced.alphas_cumprod[i].item()
        mean = (x - beta / math.sqrt(1 - abar) * eps) / math.sqrt(1 - beta)
        log_var = (v + 1) / 2 * math.log(beta) + (1 - v) / 2 * spaced.posterior_log_variance_clipped[i].item()
        x = mean if z is None else mean + math.exp(0.5 * log_var) * z
    torch.testing.assert_close(out, x)


@pytest.mark.parametrize("sampler, kwargs", [(ddpm_sampler, {}), (ddim_sampler, {"eta": 1.0})])
def test_per_sample_generators_make_samples_batch_independent(sampler, kwargs):
    torch.manual_seed(0)
    model = DiT(input_size=4, hidden_size=32, depth=2, num_heads=2, num_classes=3, encoder_depth=1).eval()
    torch.nn.init.normal_(model.final_layer.linear.weight, std=0.1)  # non-zero output
    latents, y = torch.randn(4, 4, 4, 4), torch.tensor([0, 1, 2, 0])
    gens = lambda idx: [torch.Generator().manual_seed(1000 + i) for i in idx]
    common = dict(num_steps=5, cfg_scale=1.5, guidance_high=0.7, **kwargs)
    together = sampler(model, latents, y, generator=gens(range(4)), **common)
    alone = torch.cat(
        [sampler(model, latents[i : i + 1], y[i : i + 1], generator=gens([i]), **common) for i in range(4)]
    )
    # float32 model: batching changes rounding, which x0_hat = x_t / sqrt(abar_t) amplifies at the first steps.
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-4)
    other = sampler(model, latents, y, generator=gens(range(4, 8)), **common)
    assert (other - together).abs().max() > 1e-3


def test_bad_output_channels_and_eta_are_refused():
    with pytest.raises(ValueError, match="model output has 3 channels; expected 2 \\(eps\\) or 4"):
        DIFF.training_losses(
            torch.zeros(1, 3, 2, 2),
            torch.zeros(1, 2, 2, 2),
            torch.zeros(1, 2, 2, 2),
            torch.zeros(1, 2, 2, 2),
            torch.zeros(1, dtype=torch.long),
        )
    with pytest.raises(ValueError, match="eta must be >= 0, got -1"):
        ddim_sampler(LabelledOutput(), torch.zeros(1, 1, 2, 2), torch.zeros(1, dtype=torch.long), eta=-1)
