"""diffusers scheduler configs <-> fundiff recipes (plugins/fundiff_plugins/interop/diffusers_config.py).

The configs below are written by hand in the diffusers format (the ``scheduler_config.json``
of a pipeline); nothing is downloaded and diffusers is not imported. The schedules' alpha_bar
are checked against diffusers' formulas re-derived here in numpy: ``linear`` (Ho et al. 2020),
``scaled_linear`` (Rombach et al. 2022), ``squaredcos_cap_v2`` (Nichol and Dhariwal 2021,
eq. 17, betas clipped at 0.999) and ``rescale_betas_zero_snr`` (Lin et al. 2024, Algorithm 1).
"""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import yaml

import fundiff
from fundiff import cli
from fundiff_plugins.interop.diffusers_config import diffusers_config_from_recipe, recipe_from_diffusers_config

U = float(np.finfo(np.float64).eps)
R = 64  # roundings per operation, as fundiff.testing.ROUNDINGS

# Stable Diffusion 1.5's scheduler_config.json
SD15_PNDM = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}
# a v-prediction model sampled with DDIM from the last timestep (Stable Diffusion 2.x style)
DDIM_V_TRAILING = {
    "_class_name": "DDIMScheduler",
    "_diffusers_version": "0.25.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "set_alpha_to_one": True,
    "steps_offset": 0,
    "timestep_spacing": "trailing",
    "trained_betas": None,
}
DPM_MULTISTEP = {
    "_class_name": "DPMSolverMultistepScheduler",
    "_diffusers_version": "0.25.0",
    "algorithm_type": "dpmsolver++",
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "beta_start": 0.0001,
    "dynamic_thresholding_ratio": 0.995,
    "lower_order_final": True,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "solver_order": 2,
    "solver_type": "midpoint",
    "thresholding": False,
    "trained_betas": None,
    "use_karras_sigmas": True,
}
ZERO_SNR = {
    "_class_name": "DDIMScheduler",
    "_diffusers_version": "0.25.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "rescale_betas_zero_snr": True,
    "set_alpha_to_one": True,
    "steps_offset": 0,
    "timestep_spacing": "trailing",
}
UNIPC_COSINE = {
    "_class_name": "UniPCMultistepScheduler",
    "_diffusers_version": "0.25.0",
    "beta_schedule": "squaredcos_cap_v2",
    "disable_corrector": [],
    "lower_order_final": True,
    "num_train_timesteps": 1000,
    "predict_x0": True,
    "prediction_type": "sample",
    "solver_order": 3,
    "solver_type": "bh1",
    "timestep_spacing": "trailing",
}
CONFIGS = {"sd15-pndm": SD15_PNDM, "ddim-v-trailing": DDIM_V_TRAILING, "dpm-multistep": DPM_MULTISTEP, "zero-snr": ZERO_SNR, "unipc-cosine": UNIPC_COSINE}

#: keys the converter carries both ways (the others are neutral defaults or documented approximations)
COVERED = {"_class_name", "beta_schedule", "beta_start", "beta_end", "num_train_timesteps", "prediction_type", "rescale_betas_zero_snr",
           "timestep_spacing", "skip_prk_steps", "algorithm_type", "solver_order", "solver_type", "use_karras_sigmas"}
BASE = {  # the rest of a recipe: the exact denoiser of a Gaussian mixture (no training)
    "data": {"name": "gmm", "modes": 4},
    "chain": "vp",
    "noise": "gaussian",
    "denoiser": "gmm-oracle",
    "weighting": "eps-mse",
    "guidance": "none",
}


def diffusers_alphas_cumprod(config: dict) -> np.ndarray:
    """alphas_cumprod as diffusers computes it for ``config``, in numpy float64."""
    T = config["num_train_timesteps"]
    kind = config["beta_schedule"]
    if kind == "linear":
        betas = np.linspace(config["beta_start"], config["beta_end"], T, dtype=np.float64)
    elif kind == "scaled_linear":
        betas = np.linspace(config["beta_start"] ** 0.5, config["beta_end"] ** 0.5, T, dtype=np.float64) ** 2
    else:
        f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        betas = np.array([min(1 - f((i + 1) / T) / f(i / T), 0.999) for i in range(T)])
    alphas_cumprod = np.cumprod(1.0 - betas)
    if config.get("rescale_betas_zero_snr"):
        root = np.sqrt(alphas_cumprod)
        first, last = root[0], root[-1]
        root = (root - last) * first / (first - last)
        alphas_cumprod = root**2
    return alphas_cumprod


def loaded(sections: dict, registry):
    return fundiff.load_recipe({**BASE, **{k: v for k, v in sections.items() if k != "notes"}}, registry)


@pytest.mark.parametrize("name", CONFIGS)
def test_alphas_cumprod_match_diffusers(name, registry):
    """alpha_bar_k of the converted schedule equals diffusers' formula for the config. Bound:
    the running product of T factors rounds T times (R U T relative); the zero-SNR rescaling
    subtracts s_T from s_k, amplifying that by s_k / (s_k - s_T)."""
    config = CONFIGS[name]
    schedule = loaded(recipe_from_diffusers_config(config), registry)["schedule"]
    ours = schedule.alphas_cumprod().numpy()
    theirs = diffusers_alphas_cumprod(config)
    assert ours.shape == theirs.shape == (config["num_train_timesteps"],)
    T = config["num_train_timesteps"]
    amplification = 1.0
    if config.get("rescale_betas_zero_snr"):
        root = np.sqrt(diffusers_alphas_cumprod({**config, "rescale_betas_zero_snr": False}))
        amplification = root / np.maximum(root - root[-1], 1e-300)
        assert ours[-1] == 0.0 and theirs[-1] < 1e-30  # zero terminal SNR: no signal at k = T
        ours, theirs, amplification = ours[:-1], theirs[:-1], amplification[:-1]
    tol = 2 * R * U * T * (1.0 + amplification) * theirs
    bad = np.abs(ours - theirs) > tol
    assert not bad.any(), f"first mismatch at k={np.argmax(bad) + 1}: {ours[bad][:3]} vs {theirs[bad][:3]}"


def test_sections_of_the_sd15_config():
    """SD 1.5: PNDM (plms with diffusers' Heun warm start), scaled-linear, eps, leading spacing with offset 1."""
    sections = recipe_from_diffusers_config(SD15_PNDM)
    assert sections["schedule"] == {"name": "scaled-linear", "num_steps": 1000, "beta_start": 0.00085, "beta_end": 0.012}
    assert sections["parameterization"] == {"name": "eps"}
    assert sections["sampler"] == {"name": "plms", "warm_start": "heun"}
    assert sections["spacing"] == {"name": "leading", "offset": 1}
    assert any("set_alpha_to_one" in note for note in sections["notes"])
    zero = recipe_from_diffusers_config(ZERO_SNR)
    assert zero["schedule"]["name"] == "zero-terminal-snr" and zero["schedule"]["base"]["name"] == "scaled-linear"
    assert recipe_from_diffusers_config(DPM_MULTISTEP)["spacing"] == {"name": "karras"}
    assert recipe_from_diffusers_config(UNIPC_COSINE)["sampler"] == {"name": "unipc", "order": 3, "variant": "bh1"}


@pytest.mark.parametrize("name", CONFIGS)
def test_round_trips(name, registry):
    """recipe -> config -> recipe is the identity; config -> recipe -> config is on the covered keys;
    and the converted sections load as a recipe and sample finitely."""
    config = CONFIGS[name]
    sections = recipe_from_diffusers_config(config)
    sections.pop("notes", None)
    back = diffusers_config_from_recipe(sections)
    again = recipe_from_diffusers_config(back)
    again.pop("notes", None)
    assert again == sections
    for key in COVERED & set(config):
        if key == "solver_type" and config["_class_name"] == "DPMSolverMultistepScheduler":
            assert back[key] == "midpoint"
        elif key != "timestep_spacing" or "use_karras_sigmas" not in config:
            assert back[key] == config[key], key
    recipe = loaded(sections, registry)
    samples, _ = fundiff.Pipeline(recipe).sample(64, steps=10)
    assert samples.isfinite().all()


@pytest.mark.parametrize(
    "change, key",
    [
        ({"thresholding": True}, "thresholding"),
        ({"clip_sample": True}, "clip_sample"),
        ({"beta_schedule": "sigmoid"}, "beta_schedule"),
        ({"_class_name": "LCMScheduler"}, "_class_name"),
        ({"prediction_type": "flow"}, "prediction_type"),
        ({"timestep_spacing": "ragged"}, "timestep_spacing"),
        ({"original_inference_steps": 50}, "original_inference_steps"),
        ({"trained_betas": [0.1, 0.2]}, "trained_betas"),
    ],
)
def test_unsupported_keys_are_named(change, key):
    with pytest.raises(fundiff.FundiffError, match=key):
        recipe_from_diffusers_config({**SD15_PNDM, **change})


def test_unconvertible_recipe_sections_are_named():
    sections = recipe_from_diffusers_config(SD15_PNDM)
    for kind, value in (("sampler", {"name": "restart"}), ("schedule", {"name": "edm"}), ("parameterization", {"name": "score"}), ("spacing", {"name": "optimized"})):
        broken = copy.deepcopy(sections)
        broken[kind] = value
        with pytest.raises(fundiff.FundiffError, match=repr(value["name"])):
            diffusers_config_from_recipe(broken)


def test_cli_convert_both_ways(tmp_path, capsys):
    source = tmp_path / "scheduler_config.json"
    source.write_text(json.dumps(ZERO_SNR))
    out = tmp_path / "sections.yaml"
    assert cli.main(["convert", "diffusers-config", str(source), "--to-recipe", str(out)]) == 0
    sections = yaml.safe_load(out.read_text())
    assert sections["schedule"]["name"] == "zero-terminal-snr" and sections["sampler"] == {"name": "ddim", "eta": 0.0}
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({**BASE, **sections}))
    back = tmp_path / "back.json"
    assert cli.main(["convert", "recipe", str(recipe), "--to-diffusers-config", str(back)]) == 0
    config = json.loads(back.read_text())
    assert {k: config[k] for k in COVERED & set(config)} == {k: ZERO_SNR[k] for k in COVERED & set(config)}
    capsys.readouterr()
    source.write_text(json.dumps({**ZERO_SNR, "thresholding": True}))
    assert cli.main(["convert", "diffusers-config", str(source)]) == 2
    assert "thresholding" in capsys.readouterr().err
