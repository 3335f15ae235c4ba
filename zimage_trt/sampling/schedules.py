"""Sigma schedules: ComfyUI's scheduler handlers and the custom FlowMatchEuler node.

Every function returns a float32 1-D tensor of ``steps + 1`` sigmas, largest first, ending in 0
(``beta`` may return fewer: it drops repeated table indices). The arithmetic follows ComfyUI
(float32 torch, float64 numpy where ComfyUI or diffusers use it) so the values are bit-identical,
not merely close. ``calculate_sigmas`` is the single entry point for the CLI and the workflow
runner: scheduler by name, denoise truncation, option checking.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any

import numpy as np
import scipy.stats
import torch
from torch import Tensor

from zimage_trt.sampling.model_sampling import FlowSampling

SCHEDULERS: tuple[str, ...] = (
    "simple",
    "normal",
    "sgm_uniform",
    "beta",
    "karras",
    "exponential",
    "flow_match_linear",  # the KSampler-registered "FlowMatchEulerDiscreteScheduler"
    "flow_match_euler",  # the "FlowMatchEulerDiscreteScheduler (Custom)" SIGMAS node
    "diffusers_zimage",  # diffusers ZImagePipeline's default schedule
)

TIME_SHIFT_TYPES: tuple[str, ...] = ("exponential", "linear")
# The longest schedule computed, denoise truncation included (ComfyUI's own steps go to 10,000 and
# its denoise widget to 0.01): a denoise near 0 would otherwise ask for billions of sigmas.
MAX_SCHEDULE_STEPS = 100_000


def _check_steps(steps: int) -> None:
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if steps > MAX_SCHEDULE_STEPS:
        raise ValueError(
            f"steps must be at most {MAX_SCHEDULE_STEPS} (the whole schedule is computed and "
            f"held), got {steps!r}"
        )


def _append(sigmas: Tensor, value: float = 0.0) -> Tensor:
    return torch.cat([sigmas, sigmas.new_full((1,), value)])


# ---------------------------------------------------------------------------------------------
# ComfyUI scheduler handlers (comfy/samplers.py, k_diffusion/sampling.py)


def sigmas_simple(ms: FlowSampling, steps: int) -> Tensor:
    """Every (1000/steps)-th entry of the model's σ table, walking down from the top, then 0."""
    _check_steps(steps)
    stride = len(ms.sigmas) / steps
    # int() truncates the float64 product, as ComfyUI does; the index counts from the end.
    picks = [ms.sigmas[-(1 + int(x * stride))] for x in range(steps)]
    return _append(torch.stack(picks).to(torch.float32))


def sigmas_normal(ms: FlowSampling, steps: int, sgm: bool = False) -> Tensor:
    """σ(t) for t evenly spaced in timestep space from timestep(σ_max) to timestep(σ_min).

    ``sgm=True`` (sgm_uniform) spaces steps+1 points and drops the last. Without it, a model
    whose σ_min is ~0 gets steps+1 points and no appended zero.
    """
    _check_steps(steps)
    start = float(ms.timestep(ms.sigma_max))
    end = float(ms.timestep(ms.sigma_min))
    append_zero = True
    if sgm:
        timesteps = torch.linspace(start, end, steps + 1, dtype=torch.float32)[:-1]
    else:
        n = steps
        if math.isclose(float(ms.sigma(torch.tensor(end, dtype=torch.float32))), 0.0, abs_tol=1e-5):
            n, append_zero = steps + 1, False
        timesteps = torch.linspace(start, end, n, dtype=torch.float32)
    sigmas = ms.sigma(timesteps).to(torch.float32)
    return _append(sigmas) if append_zero else sigmas


def sigmas_sgm_uniform(ms: FlowSampling, steps: int) -> Tensor:
    """``normal`` with sgm=True."""
    return sigmas_normal(ms, steps, sgm=True)


def sigmas_beta(ms: FlowSampling, steps: int, alpha: float = 0.6, beta: float = 0.6) -> Tensor:
    """Table entries at Beta(α, β) quantiles of 1 − k/steps (k = 0..steps−1), then 0.

    Quantiles that round to the same table index as the previous one are skipped, so the
    schedule can be shorter than steps+1.
    """
    _check_steps(steps)
    if not (alpha > 0 and beta > 0):
        raise ValueError(f"beta scheduler needs alpha > 0 and beta > 0, got {alpha!r}, {beta!r}")
    last_index = len(ms.sigmas) - 1
    u = 1 - np.linspace(0, 1, steps, endpoint=False)
    indices = np.rint(scipy.stats.beta.ppf(u, alpha, beta) * last_index)
    picks: list[Tensor] = []
    previous = -1.0
    for index in indices:
        if index != previous:
            picks.append(ms.sigmas[int(index)])
        previous = index
    return _append(torch.stack(picks).to(torch.float32))


def _check_sigma_range(sigma_min: float, sigma_max: float, *, zero_ok: bool) -> None:
    low_ok = sigma_min >= 0 if zero_ok else sigma_min > 0
    if not (low_ok and sigma_min <= sigma_max):
        rule = "0 <= sigma_min <= sigma_max" if zero_ok else "0 < sigma_min <= sigma_max"
        raise ValueError(f"need {rule}, got sigma_min={sigma_min!r}, sigma_max={sigma_max!r}")


def sigmas_karras(steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """Karras et al. (2022): evenly spaced in σ^(1/ρ) from σ_max to σ_min, then 0."""
    _check_steps(steps)
    _check_sigma_range(sigma_min, sigma_max, zero_ok=True)
    if not rho > 0:
        raise ValueError(f"karras scheduler needs rho > 0, got {rho!r}")
    ramp = torch.linspace(0, 1, steps, dtype=torch.float32)
    min_inv_rho = sigma_min ** (1 / rho)
    max_inv_rho = sigma_max ** (1 / rho)
    return _append((max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho)


def sigmas_exponential(steps: int, sigma_min: float, sigma_max: float) -> Tensor:
    """Evenly spaced in log σ from σ_max to σ_min, then 0."""
    _check_steps(steps)
    _check_sigma_range(sigma_min, sigma_max, zero_ok=False)  # log(0) has no value
    ramp = torch.linspace(math.log(sigma_max), math.log(sigma_min), steps, dtype=torch.float32)
    return _append(ramp.exp())


# ---------------------------------------------------------------------------------------------
# The erosDiffusion FlowMatchEulerDiscreteScheduler node pack (diffusers 0.42.1 math, §5)


def sigmas_flow_match_euler(
    steps: int,
    *,
    start_at_step: int = 0,
    end_at_step: int = 9999,
    base_image_seq_len: int = 256,
    base_shift: float = 0.5,
    invert_sigmas: bool = False,
    max_image_seq_len: int = 8192,
    max_shift: float = 1.15,
    num_train_timesteps: int = 1000,
    shift: float = 3.0,
    shift_terminal: float | None = None,
    stochastic_sampling: bool = False,
    time_shift_type: str = "exponential",
    use_beta_sigmas: bool = False,
    use_dynamic_shifting: bool = False,
    use_exponential_sigmas: bool = False,
    use_karras_sigmas: bool = False,
    mu: float = 0.0,
) -> Tensor:
    """The "FlowMatchEulerDiscreteScheduler (Custom)" SIGMAS node.

    It builds diffusers' FlowMatchEulerDiscreteScheduler, calls ``set_timesteps(steps, mu=mu)``
    (the node hard-codes mu = 0) and slices ``[start_at_step : end_at_step + 1]``, falling back
    to the whole schedule when the slice is empty. It never reads the model's sampling object.
    base_shift, max_shift, base_image_seq_len, max_image_seq_len and stochastic_sampling do not
    change the sigmas (diffusers only uses them elsewhere); they are accepted so a saved node's
    widgets can be passed through unchanged.
    """
    _check_steps(steps)
    if time_shift_type not in TIME_SHIFT_TYPES:
        raise ValueError(
            f"unknown time_shift_type {time_shift_type!r}; choose one of: "
            + ", ".join(TIME_SHIFT_TYPES)
        )
    if use_karras_sigmas + use_exponential_sigmas + use_beta_sigmas > 1:
        raise ValueError(
            "only one of use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas can be on"
        )
    if num_train_timesteps < 1:
        raise ValueError(f"num_train_timesteps must be >= 1, got {num_train_timesteps!r}")
    if start_at_step < 0 or end_at_step < 0:
        raise ValueError(
            f"start_at_step and end_at_step must be >= 0, got {start_at_step}, {end_at_step}"
        )
    del base_image_seq_len, base_shift, max_image_seq_len, max_shift, stochastic_sampling

    # __init__: the float32 training table i/N (i = N..1), statically shifted unless dynamic
    # shifting is on. Only its two ends are used by set_timesteps.
    ends = torch.tensor([num_train_timesteps, 1], dtype=torch.float32) / num_train_timesteps
    if not use_dynamic_shifting:
        ends = shift * ends / (1 + (shift - 1) * ends)
    sigma_max, sigma_min = float(ends[0]), float(ends[1])

    # set_timesteps: float64 numpy from here on. The static shift is applied again, so the
    # smallest sigma is shifted twice (0.00893 rather than 0.00299 for shift 3): diffusers' quirk.
    n = num_train_timesteps
    t = np.linspace(sigma_max * n, sigma_min * n, steps) / n
    with np.errstate(divide="ignore", invalid="ignore"):
        if use_dynamic_shifting and time_shift_type == "exponential":
            # The exponent ("sigma" in diffusers) is 1.0, and x ** 1.0 == x exactly.
            s = math.exp(mu) / (math.exp(mu) + (1 / t - 1))
        elif use_dynamic_shifting:
            s = mu / (mu + (1 / t - 1))
        else:
            s = shift * t / (1 + (shift - 1) * t)
        if shift_terminal:  # diffusers tests truthiness: 0.0 means off, like None
            one_minus = 1 - s
            scale = one_minus[-1] / (1 - shift_terminal)
            s = 1 - one_minus / scale

    lo, hi = float(s[-1]), float(s[0])
    if use_karras_sigmas:
        rho = 7.0
        ramp = np.linspace(0, 1, steps)
        s = (hi ** (1 / rho) + ramp * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho
    elif use_exponential_sigmas:
        s = np.exp(np.linspace(math.log(hi), math.log(lo), steps))
    elif use_beta_sigmas:
        ppf = scipy.stats.beta.ppf(1 - np.linspace(0, 1, steps), 0.6, 0.6)
        s = lo + ppf * (hi - lo)

    sigmas = torch.from_numpy(np.asarray(s, dtype=np.float64)).to(torch.float32)
    if not torch.isfinite(sigmas).all():
        raise ValueError(
            f"FlowMatchEuler settings give non-finite sigmas {sigmas.tolist()} "
            f"(time_shift_type={time_shift_type!r}, mu={mu!r}, shift={shift!r}, "
            f"shift_terminal={shift_terminal!r}); e.g. 'linear' time shift needs mu > 0"
        )
    sigmas = _append(1.0 - sigmas, 1.0) if invert_sigmas else _append(sigmas)

    sliced = sigmas[start_at_step : min(end_at_step + 1, len(sigmas))]
    return sliced if len(sliced) else sigmas


def sigmas_flow_match_linear(steps: int) -> Tensor:
    """The KSampler-registered "FlowMatchEulerDiscreteScheduler": linspace(1, 0.001, steps), 0.

    Its handler ignores the model (ModelSamplingAuraFlow's shift included) and runs diffusers
    with shift 1, dynamic shifting on and mu = 0, where the exponential time shift is the
    identity up to float64 rounding.
    """
    return sigmas_flow_match_euler(
        steps,
        shift=1.0,
        use_dynamic_shifting=True,
        base_shift=math.log(3),
        max_shift=math.log(3),
        time_shift_type="exponential",
        mu=0.0,
    )


def sigmas_diffusers_zimage(ms: FlowSampling, steps: int) -> Tensor:
    """The schedule diffusers' ``ZImagePipeline`` (0.42) runs by default: float32
    ``linspace(1, 1/steps, steps)`` shifted once (shift = the model's, 3.0 for Z-Image) in float32,
    then 0 — ``steps`` DiT calls.

    diffusers before its "redundant Z-Image terminal timestep" fix spaced linspace(1, 0, steps)
    instead and spent its last call on a σ = 0 → 0 step (the model card's "9 steps = 8 DiT
    forwards"); that schedule is this one with ``steps − 1``.
    """
    _check_steps(steps)
    t = torch.linspace(1.0, 1.0 / steps, steps).numpy()  # get_default_z_image_sigmas
    shifted = ms.shift * t / (1 + (ms.shift - 1) * t)  # set_timesteps, numpy float32
    return _append(torch.from_numpy(np.asarray(shifted, dtype=np.float32)))


# ---------------------------------------------------------------------------------------------
# denoise and the dispatcher


def truncate_for_denoise(schedule: Callable[[int], Tensor], steps: int, denoise: float) -> Tensor:
    """KSampler / BasicScheduler denoise: the last steps+1 sigmas of an int(steps/denoise) schedule.

    denoise > 0.9999 gives the plain schedule; denoise <= 0 an empty one (the latent is returned
    unchanged).
    """
    if denoise > 0.9999:
        return schedule(steps)
    if denoise <= 0.0:
        return torch.zeros(0, dtype=torch.float32)
    total = int(steps / denoise)
    if total > MAX_SCHEDULE_STEPS:
        raise ValueError(
            f"denoise {denoise:g} with {steps} steps makes a schedule of int(steps/denoise) = "
            f"{total} steps, of which ComfyUI keeps the last {steps + 1} sigmas; at most "
            f"{MAX_SCHEDULE_STEPS} are computed: use denoise >= {steps / MAX_SCHEDULE_STEPS:.3g} "
            f"for {steps} steps"
        )
    return schedule(total)[-(steps + 1) :]


_FLOW_MATCH_EULER_OPTIONS: tuple[str, ...] = (
    "start_at_step",
    "end_at_step",
    "base_image_seq_len",
    "base_shift",
    "invert_sigmas",
    "max_image_seq_len",
    "max_shift",
    "num_train_timesteps",
    "shift",
    "shift_terminal",
    "stochastic_sampling",
    "time_shift_type",
    "use_beta_sigmas",
    "use_dynamic_shifting",
    "use_exponential_sigmas",
    "use_karras_sigmas",
    "mu",
)

SCHEDULER_OPTIONS: dict[str, tuple[str, ...]] = {
    "simple": (),
    "normal": (),
    "sgm_uniform": (),
    "beta": ("alpha", "beta"),
    # ComfyUI passes the model's σ range; the options override it (as the KarrasScheduler node).
    "karras": ("sigma_min", "sigma_max", "rho"),
    "exponential": ("sigma_min", "sigma_max"),
    "flow_match_linear": (),
    "flow_match_euler": _FLOW_MATCH_EULER_OPTIONS,
    "diffusers_zimage": (),
}

# What each option holds: "number" (finite), "int", "bool", "str", or "number|None".
OPTION_KINDS: dict[str, str] = {
    **dict.fromkeys(("alpha", "beta", "sigma_min", "sigma_max", "rho"), "number"),
    **dict.fromkeys(("base_shift", "max_shift", "shift", "mu"), "number"),
    **dict.fromkeys(("start_at_step", "end_at_step", "base_image_seq_len"), "int"),
    **dict.fromkeys(("max_image_seq_len", "num_train_timesteps"), "int"),
    **dict.fromkeys(("invert_sigmas", "stochastic_sampling", "use_beta_sigmas"), "bool"),
    **dict.fromkeys(("use_dynamic_shifting", "use_exponential_sigmas"), "bool"),
    "use_karras_sigmas": "bool",
    "shift_terminal": "number|None",
    "time_shift_type": "str",
}
_KIND_NAMES = {
    "number": "a finite number",
    "number|None": "a finite number or null",
    "int": "an integer below 2**63 in size",
    "bool": "true or false",
    "str": "a string",
}


def _option_ok(kind: str, value: Any) -> bool:
    if kind == "number|None" and value is None:
        return True
    if isinstance(value, bool) or kind == "bool":
        return kind == "bool" and isinstance(value, bool)
    if kind == "str":
        return isinstance(value, str)
    if kind == "int":
        return isinstance(value, int) and abs(value) < 2**63
    if not isinstance(value, numbers.Real):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:  # an int past the float range
        return False


def _check_option_types(name: str, options: dict[str, Any]) -> None:
    """Each option of the kind the schedule computes with (a string or NaN would otherwise
    surface as a TypeError deep in the math, or as NaN sigmas)."""
    for option, value in options.items():
        kind = OPTION_KINDS[option]
        if not _option_ok(kind, value):
            raise ValueError(
                f"option {option!r} of scheduler {name!r} must be {_KIND_NAMES[kind]}, "
                f"got {value!r}"
            )


def _schedule_for(name: str, ms: FlowSampling, options: dict[str, Any]) -> Callable[[int], Tensor]:
    if name == "simple":
        return lambda n: sigmas_simple(ms, n)
    if name == "normal":
        return lambda n: sigmas_normal(ms, n)
    if name == "sgm_uniform":
        return lambda n: sigmas_sgm_uniform(ms, n)
    if name == "beta":
        return lambda n: sigmas_beta(ms, n, **options)
    if name in ("karras", "exponential"):
        sigma_range = {"sigma_min": float(ms.sigma_min), "sigma_max": float(ms.sigma_max)}
        sigma_range.update(options)
        fn = sigmas_karras if name == "karras" else sigmas_exponential
        return lambda n: fn(n, **sigma_range)
    if name == "flow_match_linear":
        return sigmas_flow_match_linear
    if name == "diffusers_zimage":
        return lambda n: sigmas_diffusers_zimage(ms, n)
    return lambda n: sigmas_flow_match_euler(n, **options)


def calculate_sigmas(
    name: str, ms: FlowSampling, steps: int, denoise: float = 1.0, **options: Any
) -> Tensor:
    """Sigmas for scheduler ``name`` (one of SCHEDULERS), with denoise truncation.

    ``options`` are the scheduler's own parameters (SCHEDULER_OPTIONS). For flow_match_euler
    ``steps`` is the node's steps widget, and denoise < 1 truncates its (sliced) output the same
    way as for the KSampler schedulers. flow_match_linear and flow_match_euler ignore ``ms``.
    Unlike ComfyUI, an unknown name is an error, not a silent fallback to "simple".
    """
    if name not in SCHEDULER_OPTIONS:
        raise ValueError(f"unknown scheduler {name!r}; choose one of: {', '.join(SCHEDULERS)}")
    accepted = SCHEDULER_OPTIONS[name]
    for option in options:
        if option not in accepted:
            allowed = ", ".join(accepted) if accepted else "none"
            raise ValueError(
                f"unknown option {option!r} for scheduler {name!r}; accepted options: {allowed}"
            )
    _check_option_types(name, options)
    _check_steps(steps)
    if not 0.0 <= denoise <= 1.0:
        raise ValueError(f"denoise must be in [0, 1], got {denoise!r}")
    return truncate_for_denoise(_schedule_for(name, ms, options), steps, denoise)
