"""The Gaussian diffusion process of guided-diffusion, in its spaced (respaced-timestep) form.

Blended Diffusion samples with OpenAI's 1000-step linear schedule respaced to 100 steps, guiding either the
DDPM mean (``condition_mean``) or the DDIM score (``condition_score``). The numbers must match the original
to the last float: schedule tables are float64 numpy arrays, and every per-timestep coefficient is gathered
in float64 and only then cast to float32, as the original's ``_extract_into_tensor`` does. Spacing keeps
alpha-bar at the kept steps and recomputes the betas from it, so the spaced process is a true Markov chain.

Only what the editor needs is here: eps-predicting models with learned-range (``learn_sigma``) or fixed
variances; no training losses.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .errors import BlendedInputError

__all__ = ["GaussianDiffusion", "NoiseSchedule", "beta_schedule", "create_diffusion", "space_timesteps"]

LINEAR_BETA_START = 0.0001
LINEAR_BETA_END = 0.02
COSINE_OFFSET = 0.008
COSINE_MAX_BETA = 0.999
RESCALED_TIMESTEP_RANGE = 1000.0

TimestepLike = torch.Tensor | int


def beta_schedule(name: str, num_steps: int) -> np.ndarray:
    """The named beta schedule of the original (float64), for ``num_steps`` training steps.

    The linear schedule is scaled by ``1000 / num_steps`` so that any step count spans the same noise range
    as the 1000-step models.
    """
    if num_steps < 1:
        raise BlendedInputError(f"the diffusion needs at least 1 step, got {num_steps}")
    if name == "linear":
        scale = 1000 / num_steps
        return np.linspace(scale * LINEAR_BETA_START, scale * LINEAR_BETA_END, num_steps, dtype=np.float64)
    if name == "cosine":
        def alpha_bar(fraction: float) -> float:
            return math.cos((fraction + COSINE_OFFSET) / (1 + COSINE_OFFSET) * math.pi / 2) ** 2

        return np.array(
            [min(1 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), COSINE_MAX_BETA)
             for i in range(num_steps)],
            dtype=np.float64,
        )
    raise BlendedInputError(f"unknown noise schedule {name!r}: use 'linear' (the released models) or 'cosine'")


@dataclass(frozen=True)
class NoiseSchedule:
    """The training noise schedule of a model: it belongs to the weights, so the loader carries it to the sampler.

    ``name`` and ``steps`` are the original's ``noise_schedule`` and ``diffusion_steps`` (the released models:
    "linear", 1000; improved-diffusion models may be "cosine").
    """

    name: str = "linear"
    steps: int = 1000

    def __post_init__(self) -> None:
        beta_schedule(self.name, int(self.steps))  # refuses unknown names and step counts < 1 now, not later

    @classmethod
    def from_original_kwargs(cls, kwargs: Mapping[str, Any]) -> "NoiseSchedule":
        """From ``create_model_and_diffusion`` kwargs (a config.json); missing keys take the original's defaults."""
        try:
            steps = int(kwargs.get("diffusion_steps", 1000))
        except (TypeError, ValueError) as exc:
            raise BlendedInputError(
                f"diffusion_steps must be a whole number, got {kwargs.get('diffusion_steps')!r}") from exc
        return cls(str(kwargs.get("noise_schedule", "linear")), steps)


def space_timesteps(num_steps: int, section_counts: str | Iterable[int]) -> set[int]:
    """Which of the ``num_steps`` original steps a respaced sampler keeps.

    ``"ddimN"`` keeps every k-th step for the integer stride k giving exactly N steps (as the DDIM paper).
    Otherwise the steps are cut into equal sections ("10,15,20": three sections, the first
    ``num_steps % sections`` one step longer) and each keeps its count of steps evenly spread, first and last
    included, with Python's round-half-to-even on an accumulated float stride, like the original. ``""``
    keeps all steps.
    """
    if isinstance(section_counts, str):
        # Spaces around a count are fine; inside one ("4 4") it is refused, as the original's int() does.
        text = section_counts.strip()
        if text.startswith("ddim"):
            return _ddim_steps(num_steps, text[len("ddim"):])
        if not text:
            return set(range(num_steps))
        try:
            counts = [int(part) for part in text.split(",")]
        except ValueError as exc:
            raise BlendedInputError(
                f"timestep respacing {section_counts!r} is not understood: use a step count like \"100\", "
                "per-section counts like \"10,15,20\", or \"ddim25\""
            ) from exc
    else:
        counts = [int(c) for c in section_counts]
    if not counts or any(c < 0 for c in counts):
        raise BlendedInputError(f"timestep respacing {section_counts!r} needs positive step counts")
    if sum(counts) == 0:
        raise BlendedInputError(f"timestep respacing {section_counts!r} keeps no step: ask for at least 1")

    base_size, longer_sections = divmod(num_steps, len(counts))
    kept: list[int] = []
    section_start = 0
    for index, count in enumerate(counts):
        size = base_size + (1 if index < longer_sections else 0)
        if size < count:
            raise BlendedInputError(
                f"cannot take {count} steps from a section of {size} steps (respacing {section_counts!r} of "
                f"{num_steps}); ask for fewer steps"
            )
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        position = 0.0
        for _ in range(count):
            kept.append(section_start + round(position))
            position += stride
        section_start += size
    return set(kept)


def _ddim_steps(num_steps: int, count_text: str) -> set[int]:
    try:
        wanted = int(count_text)
    except ValueError as exc:
        raise BlendedInputError(f"\"ddim{count_text}\" needs a step count, e.g. \"ddim25\"") from exc
    for stride in range(1, num_steps):
        steps = range(0, num_steps, stride)
        if len(steps) == wanted:
            return set(steps)
    raise BlendedInputError(
        f"cannot take exactly {wanted} steps from {num_steps} with an integer stride; pick another \"ddimN\" "
        "or use a plain step count"
    )


class GaussianDiffusion:
    """A spaced guided-diffusion process: ``num_timesteps`` kept steps of an ``original_num_steps`` schedule.

    Timestep indices ``t`` given to the methods are spaced indices (0 .. num_timesteps-1). All tables are
    float64 numpy arrays of length ``num_timesteps``.
    """

    def __init__(
        self,
        base_betas: np.ndarray,
        use_timesteps: Iterable[int] | None = None,
        learn_sigma: bool = True,
        rescale_timesteps: bool = True,
        sigma_small: bool = False,
    ):
        base_betas = np.asarray(base_betas, dtype=np.float64)
        if base_betas.ndim != 1 or not ((base_betas > 0) & (base_betas <= 1)).all():
            raise BlendedInputError("betas must be a 1-D array of values in (0, 1]")
        self.original_num_steps = len(base_betas)
        self.learn_sigma = learn_sigma
        self.sigma_small = sigma_small
        self.rescale_timesteps = rescale_timesteps

        kept = set(range(self.original_num_steps)) if use_timesteps is None else set(use_timesteps)
        if not kept or not kept <= set(range(self.original_num_steps)):
            raise BlendedInputError(f"kept timesteps must be a non-empty subset of 0..{self.original_num_steps - 1}")
        base_alphas_cumprod = np.cumprod(1.0 - base_betas)
        betas = []
        timestep_map = []
        previous = 1.0
        for step, alpha_cumprod in enumerate(base_alphas_cumprod):
            if step in kept:
                betas.append(1 - alpha_cumprod / previous)
                previous = alpha_cumprod
                timestep_map.append(step)
        self.timestep_map = np.array(timestep_map, dtype=np.int64)
        self._timestep_map_tensor = torch.from_numpy(self.timestep_map)
        self._set_tables(np.array(betas, dtype=np.float64))

    def _set_tables(self, betas: np.ndarray) -> None:
        self.betas = betas
        self.num_timesteps = len(betas)
        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # The posterior variance is 0 at t=0; its log borrows t=1's value so it stays finite.
        clip_source = self.posterior_variance[1] if self.num_timesteps > 1 else betas[0]
        self.posterior_log_variance_clipped = np.log(np.append(clip_source, self.posterior_variance[1:]))
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)
        self.log_betas = np.log(betas)
        # FIXED_LARGE (the original's choice without learn_sigma) uses betas, with t=0 made posterior-like.
        self.fixed_large_variance = np.append(clip_source if self.num_timesteps > 1 else betas[0], betas[1:])
        self.log_fixed_large_variance = np.log(self.fixed_large_variance)
        self._device_tables = {}

    # --- helpers -------------------------------------------------------------------------------------

    def _timesteps(self, t: TimestepLike, x: torch.Tensor) -> TimestepLike:
        """A spaced index as a Python int, or spaced indices as a [B] long tensor on ``x``'s device.

        An int (what the sampler passes) is range-checked here, on the host. A CPU tensor is checked too; a
        tensor already on an accelerator is trusted, since checking it would make the host wait for the device.
        """
        if isinstance(t, (int, np.integer)):
            if not 0 <= int(t) < self.num_timesteps:
                raise BlendedInputError(f"timestep index out of range 0..{self.num_timesteps - 1}: {int(t)}")
            return int(t)
        t = torch.as_tensor(t, dtype=torch.long)
        if t.device.type == "cpu" and (t.min() < 0 or t.max() >= self.num_timesteps):
            raise BlendedInputError(f"timestep index out of range 0..{self.num_timesteps - 1}: {t.tolist()}")
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        return t.to(x.device)

    def device_table(self, table: np.ndarray, device) -> torch.Tensor:
        """``table`` cast to float32 and kept on ``device`` (built once per table and device).

        Casting the whole float64 table and then gathering gives the same float32 values as gathering in
        float64 and casting after (the cast is element-wise), so the original's numbers are kept while the
        step gathers on the device and never waits for the host.
        """
        device = torch.device(device)
        key = (id(table), device)
        cached = self._device_tables.get(key)
        if cached is None or cached[0] is not table:
            cached = (table, torch.from_numpy(np.asarray(table, dtype=np.float64)).float().to(device))
            self._device_tables[key] = cached
        return cached[1]

    def extract(self, table: np.ndarray, t: TimestepLike, x: torch.Tensor) -> torch.Tensor:
        """``table[t]`` as the original's float64 gather cast to float32, shaped to broadcast over ``x``."""
        t = self._timesteps(t, x)
        values = self.device_table(table, x.device)[t]
        if isinstance(t, int):  # one value for the batch: a broadcast view, no gather
            return values.reshape(1, *([1] * (x.ndim - 1))).expand(x.shape[0], *([1] * (x.ndim - 1)))
        return values.reshape(-1, *([1] * (x.ndim - 1)))

    def model_timesteps(self, t: TimestepLike, batch_size: int | None = None, device=None) -> torch.Tensor:
        """The float timesteps the UNet is given for spaced indices ``t``: original-scale, like training."""
        if isinstance(t, (int, np.integer)):
            # The same float32 arithmetic as the tensor path, done on the host, then one fill on the device.
            value = np.float32(self.timestep_map[int(t)])
            if self.rescale_timesteps:
                value = value * np.float32(RESCALED_TIMESTEP_RANGE / self.original_num_steps)
            shape = (batch_size,) if batch_size is not None else ()
            return torch.full(shape, float(value), dtype=torch.float32, device=device)
        t = torch.as_tensor(t, dtype=torch.long)
        if t.ndim == 0 and batch_size is not None:
            t = t.expand(batch_size)
        mapped = self._timestep_map_tensor.to(t.device)[t]
        if self.rescale_timesteps:
            return mapped.float() * (RESCALED_TIMESTEP_RANGE / self.original_num_steps)
        return mapped.float()

    # --- forward process -----------------------------------------------------------------------------

    def q_sample(self, x_start: torch.Tensor, t: TimestepLike, noise: torch.Tensor) -> torch.Tensor:
        """Noise a clean image to spaced step ``t``."""
        return (self.extract(self.sqrt_alphas_cumprod, t, x_start) * x_start
                + self.extract(self.sqrt_one_minus_alphas_cumprod, t, x_start) * noise)

    def q_posterior_mean_variance(
        self, x_start: torch.Tensor, x_t: torch.Tensor, t: TimestepLike
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean, variance and clipped log variance of q(x_{t-1} | x_t, x_0)."""
        mean = (self.extract(self.posterior_mean_coef1, t, x_t) * x_start
                + self.extract(self.posterior_mean_coef2, t, x_t) * x_t)
        variance = self.extract(self.posterior_variance, t, x_t)
        log_variance = self.extract(self.posterior_log_variance_clipped, t, x_t)
        return mean, variance, log_variance

    def predict_xstart_from_eps(self, x_t: torch.Tensor, t: TimestepLike, eps: torch.Tensor) -> torch.Tensor:
        return (self.extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t
                - self.extract(self.sqrt_recipm1_alphas_cumprod, t, x_t) * eps)

    def predict_eps_from_xstart(self, x_t: torch.Tensor, t: TimestepLike, pred_xstart: torch.Tensor) -> torch.Tensor:
        return ((self.extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t - pred_xstart)
                / self.extract(self.sqrt_recipm1_alphas_cumprod, t, x_t))

    # --- reverse process -----------------------------------------------------------------------------

    def p_mean_variance(
        self,
        model: Callable[..., torch.Tensor] | None,
        x: torch.Tensor,
        t: TimestepLike,
        model_kwargs: Mapping[str, Any] | None = None,
        clip_denoised: bool = False,
        model_output: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """p(x_{t-1} | x_t): ``mean``, ``variance``, ``log_variance``, ``pred_xstart`` and the model's ``eps``.

        ``model_output`` skips the model call when the caller already has the UNet's output on (x, t), e.g. one
        recorded from the original code.
        """
        t = self._timesteps(t, x)
        if model_output is None:
            if model is None:
                raise ValueError("p_mean_variance needs a model or a model_output")
            model_output = model(x, self.model_timesteps(t, x.shape[0], x.device), **(model_kwargs or {}))
        channels = x.shape[1]
        if self.learn_sigma:
            if model_output.shape[1] != 2 * channels:
                raise ValueError(
                    f"a learn_sigma model must output {2 * channels} channels, got {model_output.shape[1]}"
                )
            eps, var_values = model_output.split(channels, dim=1)
            min_log = self.extract(self.posterior_log_variance_clipped, t, x)
            max_log = self.extract(self.log_betas, t, x)
            frac = (var_values + 1) / 2
            log_variance = frac * max_log + (1 - frac) * min_log
            variance = torch.exp(log_variance)
        else:
            eps = model_output
            if self.sigma_small:
                variance_table, log_table = self.posterior_variance, self.posterior_log_variance_clipped
            else:
                variance_table, log_table = self.fixed_large_variance, self.log_fixed_large_variance
            variance = self.extract(variance_table, t, x).expand(x.shape)
            log_variance = self.extract(log_table, t, x).expand(x.shape)
        pred_xstart = self.predict_xstart_from_eps(x, t, eps)
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1, 1)
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, t)
        return {"mean": mean, "variance": variance, "log_variance": log_variance,
                "pred_xstart": pred_xstart, "eps": eps}

    def condition_mean(self, p_mean_var: Mapping[str, torch.Tensor], grad: torch.Tensor) -> torch.Tensor:
        """DDPM guidance (Sohl-Dickstein): shift the mean by variance times the gradient of log p(y|x)."""
        return p_mean_var["mean"].float() + p_mean_var["variance"] * grad.float()

    def condition_score(
        self, p_mean_var: Mapping[str, torch.Tensor], x: torch.Tensor, t: TimestepLike, grad: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """DDIM guidance (Song et al.): move eps against the gradient, then re-derive pred_xstart and mean."""
        alpha_bar = self.extract(self.alphas_cumprod, t, x)
        eps = self.predict_eps_from_xstart(x, t, p_mean_var["pred_xstart"])
        eps = eps - (1 - alpha_bar).sqrt() * grad
        out = dict(p_mean_var)
        out["eps"] = eps
        out["pred_xstart"] = self.predict_xstart_from_eps(x, t, eps)
        out["mean"], _, _ = self.q_posterior_mean_variance(out["pred_xstart"], x, t)
        return out

    def ddpm_step(
        self,
        p_mean_var: Mapping[str, torch.Tensor],
        t: TimestepLike,
        noise: torch.Tensor,
        mean: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x_{t-1} = mean + sigma * noise, with no noise at t = 0 (``mean`` overrides, e.g. a guided one)."""
        mean = p_mean_var["mean"] if mean is None else mean
        t = self._timesteps(t, mean)
        if isinstance(t, int):
            nonzero = float(t != 0)
        else:
            nonzero = (t != 0).float().reshape(-1, *([1] * (mean.ndim - 1)))
        return mean + nonzero * torch.exp(0.5 * p_mean_var["log_variance"]) * noise

    def ddim_step(
        self,
        p_mean_var: Mapping[str, torch.Tensor],
        x: torch.Tensor,
        t: TimestepLike,
        eta: float = 0.0,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One DDIM update (Song et al. eq. 12) from ``p_mean_var`` (which may be score-conditioned)."""
        pred_xstart = p_mean_var["pred_xstart"]
        eps = self.predict_eps_from_xstart(x, t, pred_xstart)
        alpha_bar = self.extract(self.alphas_cumprod, t, x)
        alpha_bar_prev = self.extract(self.alphas_cumprod_prev, t, x)
        sigma = eta * torch.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar)) * torch.sqrt(1 - alpha_bar / alpha_bar_prev)
        sample = pred_xstart * torch.sqrt(alpha_bar_prev) + torch.sqrt(1 - alpha_bar_prev - sigma**2) * eps
        if eta != 0:
            if noise is None:
                raise ValueError("ddim_step with eta > 0 needs noise")
            t = self._timesteps(t, x)
            nonzero = float(t != 0) if isinstance(t, int) else (t != 0).float().reshape(-1, *([1] * (x.ndim - 1)))
            sample = sample + nonzero * sigma * noise
        return sample


def create_diffusion(
    steps: int = 1000,
    noise_schedule: str = "linear",
    timestep_respacing: str = "100",
    learn_sigma: bool = True,
    rescale_timesteps: bool = True,
    sigma_small: bool = False,
    schedule: NoiseSchedule | None = None,
) -> GaussianDiffusion:
    """The spaced diffusion Blended Diffusion uses by default (1000 linear steps respaced to 100).

    ``schedule`` (a loaded model's :class:`NoiseSchedule`) overrides ``steps`` and ``noise_schedule``.
    """
    if schedule is not None:
        steps, noise_schedule = int(schedule.steps), schedule.name
    betas = beta_schedule(noise_schedule, steps)
    kept = space_timesteps(steps, timestep_respacing or "")
    return GaussianDiffusion(betas, kept, learn_sigma=learn_sigma, rescale_timesteps=rescale_timesteps,
                             sigma_small=sigma_small)
