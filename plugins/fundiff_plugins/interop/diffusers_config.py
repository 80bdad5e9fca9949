"""Convert between diffusers scheduler configs (``scheduler_config.json``) and fundiff recipe sections.

A diffusers scheduler config mixes four of fundiff's component kinds: the training noise
schedule (``beta_schedule``, ``beta_start``, ``beta_end``, ``num_train_timesteps``,
``rescale_betas_zero_snr``), what the network predicts (``prediction_type``), the sampler
(``_class_name`` plus its options) and the step selection (``timestep_spacing``,
``steps_offset``, ``use_karras_sigmas``). :func:`recipe_from_diffusers_config` returns those
sections of a recipe; :func:`diffusers_config_from_recipe` is its inverse on the keys it
covers. Nothing here imports diffusers: the format is read and written as plain JSON.

Schedules (diffusers' ``betas`` for T = ``num_train_timesteps``, k = 1..T):

* ``linear``: beta_k = linspace(b0, b1, T) -> ``linear`` (Ho et al. 2020);
* ``scaled_linear``: beta_k = linspace(sqrt(b0), sqrt(b1), T)^2 -> ``scaled-linear``
  (Rombach et al. 2022);
* ``squaredcos_cap_v2``: beta_k = min(1 - f(k/T) / f((k-1)/T), 0.999), f(t) = cos^2(((t +
  0.008) / 1.008) pi / 2) -> ``cosine`` (Nichol and Dhariwal 2021, eq. 17);
* ``rescale_betas_zero_snr: true`` wraps the schedule in ``zero-terminal-snr`` (Lin et al.
  2024, Algorithm 1: sqrt(alpha_bar) shifted and scaled so the last step has none of the
  signal and the first keeps its own).

Samplers follow the scheduler class; the options diffusers keeps in the config map to the
sampler's fields (``solver_order``, ``solver_type``, ``skip_prk_steps``, ...). A key that
has no fundiff equivalent, or a value that would change the numbers and that fundiff does
not implement (``thresholding: true``, ``clip_sample: true``, ``trained_betas``, ...), raises
:class:`fundiff.FundiffError` naming the key. Conversions that are close but not exact (the
``linspace`` spacing, ``set_alpha_to_one: false``) are made and described under the
returned dict's ``notes`` key.
"""

from __future__ import annotations

import copy
import importlib.util
from typing import Any

from fundiff import FundiffError

SCHEDULES = {"linear": "linear", "scaled_linear": "scaled-linear", "squaredcos_cap_v2": "cosine"}
PREDICTIONS = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
SPACINGS = {"leading": "leading", "trailing": "trailing"}

#: keys that change nothing fundiff computes, and the values under which that holds
NEUTRAL: dict[str, tuple[Any, ...]] = {
    "_diffusers_version": (),  # any value
    "_class_name": (),
    "trained_betas": (None,),
    "clip_sample": (False,),
    "clip_sample_range": (),  # only read with clip_sample
    "thresholding": (False,),
    "dynamic_thresholding_ratio": (),  # only read with thresholding
    "sample_max_value": (),
    "variance_type": (None, "fixed_small", "fixed_small_log"),
    "interpolation_type": ("linear",),
    "timestep_type": ("discrete",),
    "final_sigmas_type": ("zero",),
    "lower_order_final": (True,),
    "euler_at_final": (False,),
    "use_exponential_sigmas": (False,),
    "use_beta_sigmas": (False,),
    "use_lu_lambdas": (False,),
    "use_flow_sigmas": (False,),
    "sigma_min": (None,),
    "sigma_max": (None,),
    "predict_x0": (True,),
    "disable_corrector": ([],),
    "solver_p": (None,),
    "lambda_min_clipped": (float("-inf"), "-inf"),
    "variance_type_": (),
    "set_alpha_to_one": (True, False),  # see notes
    "rescale_betas_zero_snr": (True, False),
    "steps_offset": (),
    "use_karras_sigmas": (True, False),
    "timestep_spacing": (),
    "prediction_type": (),
    "beta_schedule": (),
    "beta_start": (),
    "beta_end": (),
    "num_train_timesteps": (),
    "solver_order": (),
    "solver_type": (),
    "algorithm_type": (),
    "skip_prk_steps": (),
    "eta": (),
    "s_noise": (),
}


def _spacing_available(name: str) -> bool:
    return importlib.util.find_spec(f"fundiff_plugins.spacings.{name}") is not None


def _sampler(cls_name: str, config: dict, notes: list[str]) -> dict:
    order = config.get("solver_order")
    if not config.get("set_alpha_to_one", True):
        notes.append("set_alpha_to_one: false (the last step goes to alpha_bar_1 instead of 1) is read as ending on clean data, as every fundiff sampler does")
    if cls_name == "DDIMScheduler":
        return {"name": "ddim", "eta": float(config.get("eta", 0.0))}
    if cls_name == "DDPMScheduler":
        return {"name": "ddpm"}
    if cls_name == "PNDMScheduler":
        return {"name": "plms", "warm_start": "heun" if config.get("skip_prk_steps", False) else "prk"}
    if cls_name == "DPMSolverMultistepScheduler":
        algorithm = config.get("algorithm_type", "dpmsolver++")
        order = 2 if order is None else int(order)
        if algorithm == "dpmsolver++" and config.get("solver_type", "midpoint") != "midpoint":
            raise FundiffError(f"diffusers config: unsupported value solver_type = {config['solver_type']!r} with dpmsolver++; fundiff's dpmpp-2m/3m use 'midpoint'")
        if algorithm == "dpmsolver++" and order in (2, 3):
            return {"name": "dpmpp-2m" if order == 2 else "dpmpp-3m"}
        if algorithm == "sde-dpmsolver++" and order == 2:
            return {"name": "dpmpp-2m-sde", "eta": 1.0, "solver_type": config.get("solver_type", "midpoint")}
        raise FundiffError(f"diffusers config: algorithm_type {algorithm!r} with solver_order {order} has no fundiff sampler (dpmsolver++ with order 2 or 3, sde-dpmsolver++ with order 2)")
    if cls_name == "DPMSolverSinglestepScheduler":
        return {"name": "dpm-solver", "order": 2 if order is None else int(order)}
    if cls_name == "UniPCMultistepScheduler":
        return {"name": "unipc", "order": 2 if order is None else int(order), "variant": config.get("solver_type", "bh2")}
    if cls_name == "DEISMultistepScheduler":
        return {"name": "deis", "order": 2 if order is None else int(order)}
    simple = {
        "EulerDiscreteScheduler": "euler",
        "EulerAncestralDiscreteScheduler": "euler-ancestral",
        "HeunDiscreteScheduler": "heun",
        "LMSDiscreteScheduler": "lms",
        "KDPM2DiscreteScheduler": "dpm2",
    }
    if cls_name in simple:
        return {"name": simple[cls_name]}
    raise FundiffError(f"diffusers config: _class_name {cls_name!r} has no fundiff sampler; supported: {', '.join(sorted(CLASS_OF))}")


#: fundiff sampler name -> diffusers scheduler class
CLASS_OF = {
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "plms": "PNDMScheduler",
    "dpmpp-2m": "DPMSolverMultistepScheduler",
    "dpmpp-3m": "DPMSolverMultistepScheduler",
    "dpmpp-2m-sde": "DPMSolverMultistepScheduler",
    "dpm-solver": "DPMSolverSinglestepScheduler",
    "unipc": "UniPCMultistepScheduler",
    "deis": "DEISMultistepScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler-ancestral": "EulerAncestralDiscreteScheduler",
    "heun": "HeunDiscreteScheduler",
    "lms": "LMSDiscreteScheduler",
    "dpm2": "KDPM2DiscreteScheduler",
}


def recipe_from_diffusers_config(config: dict) -> dict:
    """The ``schedule``, ``parameterization``, ``sampler`` and (when set) ``spacing`` sections
    of a fundiff recipe for a diffusers scheduler config, plus ``notes`` (a list of strings)
    when a conversion is approximate. Raises :class:`FundiffError` naming an unsupported key."""
    if not isinstance(config, dict) or "_class_name" not in config:
        raise FundiffError("diffusers config: expected a JSON object with a '_class_name' key (a diffusers scheduler_config.json)")
    for key, value in config.items():
        if key not in NEUTRAL:
            raise FundiffError(f"diffusers config: unsupported key {key!r} (value {value!r}); fundiff has no equivalent")
        allowed = NEUTRAL[key]
        if allowed and value not in allowed:
            raise FundiffError(f"diffusers config: unsupported value {key} = {value!r}; fundiff supports {', '.join(map(repr, allowed))}")
    notes: list[str] = []
    beta_schedule = config.get("beta_schedule", "linear")
    if beta_schedule not in SCHEDULES:
        raise FundiffError(f"diffusers config: unsupported key beta_schedule = {beta_schedule!r}; supported: {', '.join(SCHEDULES)}")
    schedule: dict[str, Any] = {"name": SCHEDULES[beta_schedule], "num_steps": int(config.get("num_train_timesteps", 1000))}
    if beta_schedule != "squaredcos_cap_v2":
        schedule["beta_start"] = float(config.get("beta_start", 0.0001))
        schedule["beta_end"] = float(config.get("beta_end", 0.02))
    if config.get("rescale_betas_zero_snr", False):
        schedule = {"name": "zero-terminal-snr", "base": schedule}
    prediction = config.get("prediction_type", "epsilon")
    if prediction not in PREDICTIONS:
        raise FundiffError(f"diffusers config: unsupported key prediction_type = {prediction!r}; supported: {', '.join(PREDICTIONS)}")
    recipe: dict[str, Any] = {
        "schedule": schedule,
        "parameterization": {"name": PREDICTIONS[prediction]},
        "sampler": _sampler(config["_class_name"], config, notes),
    }
    spacing_name = config.get("timestep_spacing", "leading" if config["_class_name"] in ("DDIMScheduler", "DDPMScheduler", "PNDMScheduler") else "linspace")
    offset = int(config.get("steps_offset", 0))
    if config.get("use_karras_sigmas", False):
        recipe["spacing"] = {"name": "karras"}
    elif spacing_name in SPACINGS and _spacing_available(SPACINGS[spacing_name]):
        recipe["spacing"] = {"name": SPACINGS[spacing_name]}
        if spacing_name == "leading":
            recipe["spacing"]["offset"] = offset
    elif spacing_name in ("linspace", "leading", "trailing"):
        notes.append(
            f"timestep_spacing {spacing_name!r}: no matching fundiff spacing is installed; the recipe samples at t evenly "
            "spaced in [0, 1] (no spacing section), close to diffusers' linspace(0, T - 1, steps) but not equal"
        )
    else:
        raise FundiffError(f"diffusers config: unsupported key timestep_spacing = {spacing_name!r}; supported: leading, trailing, linspace")
    if offset and recipe.get("spacing", {}).get("name") != "leading":
        notes.append(f"steps_offset {offset} is only used by the leading spacing; ignored")
    if notes:
        recipe["notes"] = notes
    return recipe


def _section(recipe: dict, kind: str) -> dict:
    section = recipe.get(kind)
    if section is None:
        return {}
    return {"name": section} if isinstance(section, str) else dict(section)


def diffusers_config_from_recipe(recipe: dict) -> dict:
    """A diffusers scheduler config for a recipe's schedule, parameterization, sampler and
    spacing sections (the inverse of :func:`recipe_from_diffusers_config` on the keys it
    covers). Raises :class:`FundiffError` naming a section diffusers cannot express."""
    sampler = _section(recipe, "sampler")
    if sampler.get("name") not in CLASS_OF:
        raise FundiffError(f"sampler {sampler.get('name')!r} has no diffusers scheduler; convertible: {', '.join(sorted(CLASS_OF))}")
    name = sampler["name"]
    config: dict[str, Any] = {"_class_name": CLASS_OF[name]}
    schedule = _section(recipe, "schedule")
    if schedule.get("name") == "zero-terminal-snr":
        config["rescale_betas_zero_snr"] = True
        base = schedule.get("base", {"name": "scaled-linear"})
        schedule = {"name": base} if isinstance(base, str) else dict(base)
    by_name = {v: k for k, v in SCHEDULES.items()}
    if schedule.get("name") not in by_name:
        raise FundiffError(f"schedule {schedule.get('name')!r} has no diffusers beta_schedule; convertible: {', '.join(sorted(by_name))}")
    defaults = {"linear": (0.0001, 0.02), "scaled-linear": (0.00085, 0.012)}
    config["beta_schedule"] = by_name[schedule["name"]]
    config["num_train_timesteps"] = int(schedule.get("num_steps", 1000))
    if schedule["name"] in defaults:
        config["beta_start"] = float(schedule.get("beta_start", defaults[schedule["name"]][0]))
        config["beta_end"] = float(schedule.get("beta_end", defaults[schedule["name"]][1]))
    else:
        extra = {k: v for k, v in schedule.items() if k not in ("name", "num_steps") and (k, v) not in (("offset", 0.008), ("max_beta", 0.999))}
        if extra:
            raise FundiffError(f"schedule.{next(iter(extra))}: diffusers' squaredcos_cap_v2 fixes it (offset 0.008, max_beta 0.999)")
    prediction = _section(recipe, "parameterization").get("name", "eps")
    by_param = {v: k for k, v in PREDICTIONS.items()}
    if prediction not in by_param:
        raise FundiffError(f"parameterization {prediction!r} has no diffusers prediction_type; convertible: {', '.join(sorted(by_param))}")
    config["prediction_type"] = by_param[prediction]
    if name == "ddim" and float(sampler.get("eta", 0.0)) != 0.0:
        config["eta"] = float(sampler["eta"])  # not a diffusers config key: passed to step(); kept for the round trip
    if name == "plms":
        config["skip_prk_steps"] = sampler.get("warm_start", "prk") == "heun"
    if name in ("dpmpp-2m", "dpmpp-3m"):
        config["algorithm_type"], config["solver_order"] = "dpmsolver++", 2 if name == "dpmpp-2m" else 3
        config["solver_type"] = "midpoint"
    if name == "dpmpp-2m-sde":
        if float(sampler.get("eta", 1.0)) != 1.0 or float(sampler.get("s_noise", 1.0)) != 1.0:
            raise FundiffError("sampler.eta: diffusers' sde-dpmsolver++ is the reverse SDE (eta 1, s_noise 1)")
        config["algorithm_type"], config["solver_order"] = "sde-dpmsolver++", 2
        config["solver_type"] = sampler.get("solver_type", "midpoint")
    if name in ("dpm-solver", "unipc", "deis"):
        config["solver_order"] = int(sampler.get("order", 3 if name == "dpm-solver" else 2 if name == "unipc" else 3))
    if name == "unipc":
        config["solver_type"] = sampler.get("variant", "bh2")
    spacing = _section(recipe, "spacing")
    if spacing.get("name") == "karras":
        config["use_karras_sigmas"] = True
    elif spacing.get("name") in ("leading", "trailing"):
        config["timestep_spacing"] = spacing["name"]
        config["steps_offset"] = int(spacing.get("offset", 0))
    elif spacing:
        raise FundiffError(f"spacing {spacing.get('name')!r} has no diffusers timestep_spacing; convertible: leading, trailing, karras")
    else:
        config["timestep_spacing"] = "linspace"  # the closest diffusers spacing to t evenly spaced
    return config


def read_config(path: str) -> dict:
    import json

    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, json.JSONDecodeError) as exc:
        raise FundiffError(f"{path}: not a readable JSON file ({exc})") from None


def merge_into(recipe: dict, sections: dict) -> dict:
    """``recipe`` with the converted sections replacing its own (notes dropped)."""
    out = copy.deepcopy(recipe)
    out.update({k: v for k, v in sections.items() if k != "notes"})
    return out
