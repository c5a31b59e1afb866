"""Samplers: equivalence with the official ODE outputs and closed-form Gaussian cases."""

import pytest
import torch

from loss import Interpolant
from models.sit import SiT
from samplers import euler_maruyama_sampler, euler_sampler
from tests.test_sit import reference_model


class GaussianVelocity(torch.nn.Module):
    """Exact velocity field for data x ~ N(mu_y, s^2 I) under a given interpolant.

    With x_t = a x + b eps: var = a^2 s^2 + b^2, E[x|x_t] = mu + a s^2 (x_t - a mu) / var,
    E[eps|x_t] = b (x_t - a mu) / var and v = a' E[x|x_t] + b' E[eps|x_t].
    Label num_classes (the null class) has its own mean, so guidance has an effect.
    """

    def __init__(self, means, s, path_type="linear"):
        super().__init__()
        self.means, self.s = means, s  # means: (num_classes + 1, C)
        self.num_classes = means.shape[0] - 1
        self.interp = Interpolant(path_type)
        self.calls = []

    def forward(self, x, t, y):
        self.calls.append((x.shape[0], float(t[0]), y.clone()))
        tt = t.view(-1, 1, 1, 1).to(torch.float64)
        a, b, da, db = self.interp.coefficients(tt)
        mu = self.means[y].to(torch.float64)[:, :, None, None]
        x64 = x.to(torch.float64)
        var = a**2 * self.s**2 + b**2
        x_hat = mu + a * self.s**2 * (x64 - a * mu) / var
        eps_hat = b * (x64 - a * mu) / var
        return (da * x_hat + db * eps_hat).to(x.dtype), []


def test_ode_samplers_match_official_reference(testdata):
    ref, model = reference_model(testdata)
    model.load_state_dict(ref["state_dict"])
    s = ref["sampler"]
    common = dict(model=model, latents=s["latents"], y=ref["y"], num_steps=s["num_steps"])
    low, high = s["guidance_interval"]
    torch.testing.assert_close(euler_sampler(**common, heun=False), s["euler"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(euler_sampler(**common, heun=True), s["heun"], rtol=1e-5, atol=1e-5)
    heun_cfg = euler_sampler(**common, heun=True, cfg_scale=s["cfg_scale"], guidance_low=low, guidance_high=high)
    torch.testing.assert_close(heun_cfg, s["heun_cfg"], rtol=1e-5, atol=1e-5)
    assert (heun_cfg - s["heun"]).abs().max() > 1e-3  # guidance really acted


@pytest.mark.parametrize("path_type", ["linear", "cosine"])
@pytest.mark.parametrize("heun, order", [(False, 1), (True, 2)])
def test_ode_carries_noise_to_data_gaussian_with_expected_order(path_type, heun, order):
    # The exact flow map of N(0, 1) -> N(mu, s^2) is x0 = mu + s x1, so the error is measurable pointwise.
    means = torch.tensor([[1.0, -2.0], [0.0, 0.0]], dtype=torch.float64)
    model = GaussianVelocity(means, s=0.5, path_type=path_type)
    x1 = torch.linspace(-3, 3, 8, dtype=torch.float64).view(2, 2, 2, 1).expand(2, 2, 2, 2).contiguous()
    y = torch.zeros(2, dtype=torch.long)
    exact = means[0].view(1, 2, 1, 1) + 0.5 * x1
    errors = []
    for n in (8, 16, 32, 64):
        x0 = euler_sampler(model, x1, y, num_steps=n, heun=heun, path_type=path_type)
        errors.append((x0 - exact).abs().max().item())
    ratios = [errors[i] / errors[i + 1] for i in range(3)]
    assert errors[-1] < (0.05 if order == 1 else 2e-3)
    for r in ratios:
        assert 2**order * 0.8 < r < 2**order * 1.25, (errors, ratios)


@pytest.mark.parametrize("path_type", ["linear", "cosine"])
def test_sde_reaches_data_gaussian(path_type):
    torch.manual_seed(0)
    s, mu = 0.5, 1.0
    means = torch.tensor([[mu, mu], [0.0, 0.0]], dtype=torch.float64)
    model = GaussianVelocity(means, s=s, path_type=path_type)
    x1 = torch.randn(4096, 2, 2, 2, dtype=torch.float64)
    x0 = euler_maruyama_sampler(model, x1, torch.zeros(4096, dtype=torch.long), num_steps=100, path_type=path_type)
    # The last step is the posterior mean from t=0.04: its variance is a^2 s^4 / var_t, slightly below s^2.
    a, b, _, _ = Interpolant(path_type).coefficients(torch.tensor(0.04, dtype=torch.float64))
    expected_var = (a**2 * s**4 / (a**2 * s**2 + b**2)).item()
    assert x0.mean().item() == pytest.approx(mu, abs=0.02)
    assert x0.var().item() == pytest.approx(expected_var, rel=0.04)
    # A model with the wrong variance would be told apart: the check is sharper than the data spread.
    assert abs(expected_var - s**2) < 0.04 * s**2


def test_guidance_interval_batches_only_inside():
    means = torch.tensor([[1.0], [2.0], [-1.0]], dtype=torch.float64)  # 2 classes + null
    model = GaussianVelocity(means, s=0.5)
    x1 = torch.randn(3, 1, 2, 2)
    y = torch.tensor([0, 1, 0])
    euler_sampler(model, x1, y, num_steps=10, cfg_scale=2.0, guidance_low=0.0, guidance_high=0.7)
    for batch, t, labels in model.calls:
        if t <= 0.7 + 1e-9:
            assert batch == 6 and labels[3:].tolist() == [2, 2, 2]  # null class = num_classes
        else:
            assert batch == 3 and labels.tolist() == [0, 1, 0]
    assert sum(batch == 6 for batch, _, _ in model.calls) == 7  # t = 0.7, 0.6, ..., 0.1


def test_cfg_step_by_hand():
    means = torch.tensor([[1.0], [-1.0]], dtype=torch.float64)
    model = GaussianVelocity(means, s=0.5)
    x1 = torch.randn(2, 1, 1, 1, dtype=torch.float64)
    y = torch.zeros(2, dtype=torch.long)
    out = euler_sampler(model, x1, y, num_steps=1, cfg_scale=3.0)
    t1 = torch.ones(2, dtype=torch.float64)
    v_c, v_u = model(x1, t1, y)[0], model(x1, t1, torch.ones(2, dtype=torch.long))[0]
    torch.testing.assert_close(out, x1 - (v_u + 3.0 * (v_c - v_u)))


def test_cfg_needs_a_null_class():
    with pytest.raises(ValueError, match="null class"):
        euler_sampler(lambda x, t, y: (x, []), torch.randn(1, 1, 2, 2), torch.zeros(1, dtype=torch.long), cfg_scale=2.0)


def test_sde_cfg_equals_guiding_the_drift(testdata):
    # The official SDE guides the drift v - t * score; we guide v. Both must give the same samples.
    ref, model = reference_model(testdata)
    model.load_state_dict(ref["state_dict"])
    latents, y, steps, w = ref["sampler"]["latents"], ref["y"], 6, 1.8
    torch.manual_seed(1)
    ours = euler_maruyama_sampler(model, latents, y, num_steps=steps, cfg_scale=w, guidance_high=0.7)
    interp = Interpolant("linear")
    torch.manual_seed(1)
    grid = torch.cat([torch.linspace(1, 0.04, steps, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)])
    x = latents.double()
    for i in range(steps):
        t, dt = grid[i], grid[i + 1] - grid[i]
        guided = t <= 0.7
        xin = torch.cat([x, x]) if guided else x
        yin = torch.cat([y, torch.full_like(y, 10)]) if guided else y
        tin = torch.full((xin.shape[0],), float(t), dtype=torch.float64)
        with torch.no_grad():
            v = model(xin.float(), tin.float(), yin)[0].double()
        drift = v - t * interp.score_from_velocity(v, xin, tin.view(-1, 1, 1, 1))
        if guided:
            cond, uncond = drift.chunk(2)
            drift = uncond + w * (cond - uncond)
        x = x + drift * dt
        if i < steps - 1:
            x = x + torch.sqrt(2 * t) * torch.sqrt(-dt) * torch.randn_like(x)
    torch.testing.assert_close(ours, x.float(), rtol=1e-5, atol=1e-5)


def test_sde_per_sample_generators_make_samples_batch_independent():
    model = SiT(input_size=4, hidden_size=32, depth=2, num_heads=2, num_classes=3, encoder_depth=1).eval()
    torch.nn.init.normal_(model.final_layer.linear.weight, std=0.1)  # non-zero output
    latents = torch.randn(4, 4, 4, 4)
    y = torch.tensor([0, 1, 2, 0])
    gens = lambda idx: [torch.Generator().manual_seed(1000 + i) for i in idx]
    together = euler_maruyama_sampler(model, latents, y, num_steps=5, generator=gens(range(4)))
    alone = torch.cat(
        [
            euler_maruyama_sampler(model, latents[i : i + 1], y[i : i + 1], num_steps=5, generator=gens([i]))
            for i in range(4)
        ]
    )
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)
    other = euler_maruyama_sampler(model, latents, y, num_steps=5, generator=gens(range(4, 8)))
    assert (other - together).abs().max() > 1e-3
