"""Schedules, respacing and the diffusion-process math, checked from first principles."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from blended.diffusion import GaussianDiffusion, beta_schedule, create_diffusion, space_timesteps
from blended.errors import BlendedInputError
from conftest import REF


def evenly_spread(start: int, size: int, count: int) -> list[int]:
    """count steps spread over [start, start+size-1], ends included, nearest-integer rounding."""
    if count == 1:
        return [start]
    return [start + int(np.rint(i * (size - 1) / (count - 1))) for i in range(count)]


def test_linear_and_cosine_betas():
    linear = beta_schedule("linear", 1000)
    assert linear.dtype == np.float64 and linear.shape == (1000,)
    assert linear[0] == pytest.approx(1e-4) and linear[-1] == pytest.approx(0.02)
    assert np.allclose(np.diff(linear), (0.02 - 1e-4) / 999)
    short = beta_schedule("linear", 250)  # scaled so that 250 steps span the same noise range
    assert short[0] == pytest.approx(4e-4) and short[-1] == pytest.approx(0.08)

    cosine = beta_schedule("cosine", 100)
    alpha_bar = [math.cos((i / 100 + 0.008) / 1.008 * math.pi / 2) ** 2 for i in range(101)]
    # every beta but the clipped last one keeps alpha_bar on the cosine curve
    assert np.allclose(np.cumprod(1 - cosine)[:-1], np.array(alpha_bar[1:-1]) / alpha_bar[0], rtol=1e-9)
    assert cosine[-1] == 0.999 and cosine.max() == 0.999
    with pytest.raises(BlendedInputError):
        beta_schedule("quadratic", 10)


def test_uniform_respacing_100():
    kept = sorted(space_timesteps(1000, "100"))
    assert kept == evenly_spread(0, 1000, 100)
    assert kept[:8] == [0, 10, 20, 30, 40, 50, 61, 71] and kept[74] == 747 and kept[-1] == 999
    reference = load_file(str(REF / "gd_tiny" / "reference.safetensors"))
    assert kept == reference["spaced_timestep_map"].tolist()


def test_sectioned_respacing():
    kept = sorted(space_timesteps(1000, "10,15,20"))
    # 1000 = 334 + 333 + 333: the first section takes the remainder.
    expected = evenly_spread(0, 334, 10) + evenly_spread(334, 333, 15) + evenly_spread(667, 333, 20)
    assert kept == expected and len(kept) == 45
    assert sorted(space_timesteps(1000, [10, 15, 20])) == expected
    assert sorted(space_timesteps(10, "1,1")) == [0, 5]


def test_ddim_respacing_uses_an_integer_stride():
    assert space_timesteps(1000, "ddim25") == set(range(0, 1000, 40))
    assert space_timesteps(1000, "ddim100") == set(range(0, 1000, 10))
    assert space_timesteps(1000, "ddim7") == set(range(0, 1000, 143))
    with pytest.raises(BlendedInputError, match="integer stride"):
        space_timesteps(1000, "ddim999")


def test_empty_respacing_keeps_every_step():
    assert space_timesteps(1000, "") == set(range(1000))
    full = create_diffusion(timestep_respacing="")
    assert full.num_timesteps == 1000
    np.testing.assert_allclose(full.betas, beta_schedule("linear", 1000), rtol=1e-12)


@pytest.mark.parametrize("bad", ["abc", "2000", "10,x", "600,600", "4 4", "1 0,5", "ddim 2 5"])
def test_bad_respacing_is_refused(bad):
    with pytest.raises(BlendedInputError):
        space_timesteps(1000, bad)


def test_spaces_around_respacing_counts_are_fine():
    assert space_timesteps(1000, " 10, 15 ,20 ") == space_timesteps(1000, "10,15,20")
    assert space_timesteps(1000, " ddim25 ") == space_timesteps(1000, "ddim25")


@pytest.mark.parametrize("respacing", ["100", "10,15,20", "ddim25"])
def test_spacing_preserves_alpha_bar_at_kept_steps(respacing):
    diffusion = create_diffusion(timestep_respacing=respacing)
    full_alpha_bar = np.cumprod(1 - beta_schedule("linear", 1000))
    assert diffusion.timestep_map.tolist() == sorted(space_timesteps(1000, respacing))
    np.testing.assert_allclose(diffusion.alphas_cumprod, full_alpha_bar[diffusion.timestep_map], rtol=1e-12)
    for table in ("betas", "alphas_cumprod", "posterior_variance", "sqrt_recipm1_alphas_cumprod"):
        assert getattr(diffusion, table).dtype == np.float64
    assert diffusion.posterior_variance[0] == 0
    assert diffusion.posterior_log_variance_clipped[0] == diffusion.posterior_log_variance_clipped[1]


def test_model_timesteps_map_and_rescale():
    rescaled = create_diffusion(steps=500, timestep_respacing="50", rescale_timesteps=True)
    t = torch.tensor([0, 7, 49])
    expected = torch.tensor(rescaled.timestep_map[[0, 7, 49]] * 2.0, dtype=torch.float32)
    assert torch.equal(rescaled.model_timesteps(t), expected)
    plain = create_diffusion(steps=500, timestep_respacing="50", rescale_timesteps=False)
    assert torch.equal(plain.model_timesteps(t), expected / 2)
    assert plain.model_timesteps(3, batch_size=2).shape == (2,)


def test_extract_gathers_in_float64_then_casts():
    diffusion = create_diffusion()
    x = torch.zeros(3, 3, 4, 4)
    got = diffusion.extract(diffusion.sqrt_recipm1_alphas_cumprod, torch.tensor([0, 50, 99]), x)
    assert got.dtype == torch.float32 and got.shape == (3, 1, 1, 1)
    want = torch.from_numpy(diffusion.sqrt_recipm1_alphas_cumprod[[0, 50, 99]]).float()
    assert torch.equal(got.flatten(), want)
    assert torch.equal(diffusion.extract(diffusion.betas, 5, x).flatten(), torch.full((3,), diffusion.betas[5]).float())
    with pytest.raises(BlendedInputError):
        diffusion.extract(diffusion.betas, 100, x)


def test_q_sample_and_posterior():
    diffusion = create_diffusion()
    torch.manual_seed(0)
    x0, noise = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    alpha_bar = diffusion.alphas_cumprod[74]
    noised = diffusion.q_sample(x0, 74, noise)
    torch.testing.assert_close(noised, math.sqrt(alpha_bar) * x0 + math.sqrt(1 - alpha_bar) * noise)
    # the posterior mean of (x0, x_t) is a convex-ish combination that returns x0 at t = 0
    mean, variance, _ = diffusion.q_posterior_mean_variance(x0, noised, torch.tensor([0, 0]))
    torch.testing.assert_close(mean, x0)
    assert torch.all(variance == 0)
    # eps <-> xstart conversions are inverse
    eps = diffusion.predict_eps_from_xstart(noised, 74, x0)
    torch.testing.assert_close(eps, noise, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(diffusion.predict_xstart_from_eps(noised, 74, eps), x0, rtol=1e-4, atol=1e-4)


class ConstantModel(torch.nn.Module):
    """Returns a fixed output and records the timesteps it was given."""

    def __init__(self, output: torch.Tensor):
        super().__init__()
        self.output = output
        self.seen: list[torch.Tensor] = []

    def forward(self, x, timesteps):
        self.seen.append(timesteps)
        return self.output


def test_p_mean_variance_learned_range_and_model_output_reuse():
    diffusion = create_diffusion()
    torch.manual_seed(1)
    x = torch.randn(2, 3, 8, 8)
    output = torch.randn(2, 6, 8, 8)
    output[:, 3:] = output[:, 3:].clamp(-1, 1)
    model = ConstantModel(output)
    pmv = diffusion.p_mean_variance(model, x, 74)
    assert torch.equal(model.seen[0], torch.tensor([747.0, 747.0]))
    frac = (output[:, 3:] + 1) / 2
    log_var = frac * math.log(diffusion.betas[74]) + (1 - frac) * math.log(diffusion.posterior_variance[74])
    torch.testing.assert_close(pmv["log_variance"], log_var)
    torch.testing.assert_close(pmv["variance"], log_var.exp())
    assert torch.equal(pmv["eps"], output[:, :3])
    reused = diffusion.p_mean_variance(None, x, 74, model_output=output)
    assert len(model.seen) == 1
    for key in pmv:
        assert torch.equal(pmv[key], reused[key]), key
    clipped = diffusion.p_mean_variance(None, x, 74, model_output=output, clip_denoised=True)
    assert clipped["pred_xstart"].abs().max() <= 1


@pytest.mark.parametrize("sigma_small", [False, True])
def test_fixed_variance_without_learn_sigma(sigma_small):
    diffusion = create_diffusion(learn_sigma=False, sigma_small=sigma_small)
    x = torch.randn(1, 3, 4, 4)
    pmv = diffusion.p_mean_variance(None, x, 50, model_output=torch.randn(1, 3, 4, 4))
    want = diffusion.posterior_variance[50] if sigma_small else diffusion.betas[50]
    torch.testing.assert_close(pmv["variance"], torch.full_like(x, want))
    torch.testing.assert_close(pmv["log_variance"], torch.full_like(x, math.log(want)))


def test_condition_mean_and_ddpm_step():
    diffusion = create_diffusion()
    torch.manual_seed(2)
    x, output = torch.randn(2, 3, 8, 8), torch.randn(2, 6, 8, 8).tanh()
    pmv = diffusion.p_mean_variance(None, x, 74, model_output=output)
    grad = torch.randn_like(x)
    guided = diffusion.condition_mean(pmv, grad)
    torch.testing.assert_close(guided, pmv["mean"] + pmv["variance"] * grad)
    noise = torch.randn_like(x)
    sample = diffusion.ddpm_step(pmv, 74, noise, mean=guided)
    torch.testing.assert_close(sample, guided + torch.exp(0.5 * pmv["log_variance"]) * noise)
    final = diffusion.p_mean_variance(None, x, 0, model_output=output)
    assert torch.equal(diffusion.ddpm_step(final, 0, noise), final["mean"])


def test_condition_score_and_ddim_step():
    diffusion = create_diffusion(timestep_respacing="ddim25")
    torch.manual_seed(3)
    x, output = torch.randn(2, 3, 8, 8), torch.randn(2, 6, 8, 8).tanh()
    t = 10
    pmv = diffusion.p_mean_variance(None, x, t, model_output=output)
    alpha_bar, alpha_bar_prev = diffusion.alphas_cumprod[t], diffusion.alphas_cumprod_prev[t]

    unguided = diffusion.condition_score(pmv, x, t, torch.zeros_like(x))
    torch.testing.assert_close(unguided["pred_xstart"], pmv["pred_xstart"], rtol=1e-4, atol=1e-4)
    grad = torch.randn_like(x)
    guided = diffusion.condition_score(pmv, x, t, grad)
    eps = pmv["eps"] - math.sqrt(1 - alpha_bar) * grad
    torch.testing.assert_close(guided["eps"], eps, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(
        guided["pred_xstart"], (x - math.sqrt(1 - alpha_bar) * eps) / math.sqrt(alpha_bar), rtol=1e-4, atol=1e-4
    )
    assert torch.equal(pmv["mean"], diffusion.p_mean_variance(None, x, t, model_output=output)["mean"])  # not mutated

    deterministic = diffusion.ddim_step(guided, x, t, eta=0.0)
    want = math.sqrt(alpha_bar_prev) * guided["pred_xstart"] + math.sqrt(1 - alpha_bar_prev) * eps
    torch.testing.assert_close(deterministic, want, rtol=1e-4, atol=1e-4)

    noise = torch.randn_like(x)
    sigma = math.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar)) * math.sqrt(1 - alpha_bar / alpha_bar_prev)
    stochastic = diffusion.ddim_step(guided, x, t, eta=1.0, noise=noise)
    want = (math.sqrt(alpha_bar_prev) * guided["pred_xstart"]
            + math.sqrt(1 - alpha_bar_prev - sigma**2) * eps + sigma * noise)
    torch.testing.assert_close(stochastic, want, rtol=1e-4, atol=1e-4)
    # at t = 0, DDIM returns the clean prediction
    last = diffusion.p_mean_variance(None, x, 0, model_output=output)
    torch.testing.assert_close(diffusion.ddim_step(last, x, 0, eta=1.0, noise=noise), last["pred_xstart"])


def test_direct_construction_validates_inputs():
    with pytest.raises(BlendedInputError):
        GaussianDiffusion(np.array([0.1, 2.0]))
    with pytest.raises(BlendedInputError):
        GaussianDiffusion(beta_schedule("linear", 10), use_timesteps=[3, 12])
