"""Whole samplers through the fused executor (fundiff.fused) against the torch reference.

Without CUDA the Triton kernels run under the interpreter (TRITON_INTERPRET=1, set before the
kernel module loads; see test_fused_kernels.py); with CUDA they run compiled.

Tolerance: the fused path evaluates the same float32 algebra as the torch backend in another
order (one kernel per step instead of one torch operation per term), so its error against the
float64 reference path must be of the size of the float32 reference path's own error: at most
RATIO times it. Stochastic samplers add, per step, the in-kernel Box-Muller noise's deviation
from the float64 draws (NOISE_ATOL, test_fused_kernels) times the noise coefficient, which is
at most sigma <= 1 on the vp chain.
"""

from __future__ import annotations

import itertools
import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before any kernel module import

import pytest
from helpers import oracle_recipe

import fundiff
from fundiff import FundiffError, fused, make_denoise, rng
from fundiff.pipeline import ComponentNoise

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
RATIO = 3.0
NOISE_ATOL = 5e-6
STEPS = 8
SHAPE = (3, 5, 7)  # 105 elements per sample: not a multiple of 4 or of a block
IDS = torch.arange(5) + 11
REGISTRY = fundiff.Registry.discover()


class ToyConditional(torch.nn.Module):
    """A smooth conditional x0-prediction network: tanh(0.8 x + label offset), bounded, so the
    samples stay O(1) and float32 rounding is the only difference between the paths."""

    def forward(self, x, logsnr, cond=None):
        offset = 0.0 if cond is None else torch.where(cond >= 0, cond.float() * 0.3 - 0.5, 0.1).reshape(-1, *([1] * (x.ndim - 1)))
        return torch.tanh(0.8 * x + offset)


def run(sampler, guidance, backend: str, dtype=torch.float32, ids=IDS, callback=None) -> torch.Tensor:
    levels = fundiff.noise_levels(REGISTRY.build("schedule", "cosine"), REGISTRY.build("chain", "vp"), STEPS)
    x = rng.NoiseStream(3, ids, SHAPE, stream=rng.STREAM_PRIOR, dtype=dtype, device=DEVICE).normal(0)
    noise = ComponentNoise(REGISTRY.build("noise", "gaussian"), rng.NoiseStream(3, ids, SHAPE, dtype=dtype, device=DEVICE))
    cond = (ids % 3).to(DEVICE)
    denoise = make_denoise(ToyConditional(), REGISTRY.build("parameterization", "x0"), guidance, cond, levels)
    with torch.no_grad(), fused.use_backend(backend):
        return sampler.sample(denoise, x, levels, noise, callback)


SAMPLERS = [
    ("ddim", {}),
    ("ddim", {"eta": 1.0}),
    ("ddpm", {}),
    ("euler", {}),
    ("euler-ancestral", {}),
    ("heun", {}),
    ("heun", {"s_churn": 5.0}),
    ("dpmpp-2m", {}),
    ("dpmpp-2m-sde", {}),
    ("dpmpp-2m-sde", {"noise": "brownian"}),
    ("unipc", {}),
    ("unipc", {"order": 3}),
    ("deis", {}),
    ("deis", {"variant": "lambdaAB"}),
    ("dpm2", {}),
    ("lms", {}),
    ("dpmpp-2s-ancestral", {}),
    ("dpmpp-3m-sde", {}),
]
GUIDANCES = {
    "none": {"name": "none"},
    "cfg": {"name": "cfg", "scale": 3.0},
    "cfg-rescaled-thresholded": {"name": "cfg", "scale": 2.0, "rescale": 0.7, "rescale_space": "eps", "dynamic_threshold": 0.9},
}
STOCHASTIC = {
    "ddim": "eta",
    "ddpm": None,
    "euler-ancestral": None,
    "heun": "s_churn",
    "dpmpp-2m-sde": None,
    "dpmpp-2s-ancestral": None,
    "dpmpp-3m-sde": None,
}


def _cases():
    for name, params in SAMPLERS:
        yield name, params, "cfg"
    for name, params in (("dpmpp-2m", {}), ("euler-ancestral", {}), ("unipc", {})):
        yield name, params, "none"
        yield name, params, "cfg-rescaled-thresholded"


@pytest.mark.parametrize(
    "name, params, guidance",
    list(_cases()),
    ids=lambda v: str(v) if not isinstance(v, dict) else "-".join(f"{k}={w}" for k, w in v.items()) or "default",
)
def test_fused_sampler_is_as_accurate_as_the_torch_reference(name, params, guidance):
    """The fused path's samples (and every step's x and x0 estimate) are as close to the
    float64 reference path as the float32 torch path is (RATIO, plus the noise allowance for
    stochastic samplers): guidance combined in the kernel (CFG w = 3; rescaled in eps space
    and dynamically thresholded), in-kernel noise keyed like the reference's draws."""
    sampler = REGISTRY.build("sampler", name, steps=STEPS, **params)
    guide = REGISTRY.build(
        "guidance", **{k: v for k, v in GUIDANCES[guidance].items() if k != "name"}, name=GUIDANCES[guidance]["name"]
    )
    traces = {}
    results = {}
    for backend, dtype in (("torch", torch.float64), ("torch", torch.float32), ("triton", torch.float32)):
        trace: list = []
        results[(backend, dtype)] = run(
            sampler, guide, backend, dtype, callback=lambda i, x, x0, trace=trace: trace.append((x.clone(), x0.clone()))
        )
        traces[(backend, dtype)] = trace
    exact = results[("torch", torch.float64)]
    err_reference = float((results[("torch", torch.float32)].double() - exact).abs().max())
    err_fused = float((results[("triton", torch.float32)].double() - exact).abs().max())
    stochastic = (
        name in STOCHASTIC
        and (STOCHASTIC[name] is None or params.get(STOCHASTIC[name], 0) > 0)
        and params.get("noise") != "brownian"
    )
    allowance = STEPS * NOISE_ATOL if stochastic else 0.0
    assert err_fused <= RATIO * err_reference + allowance, (err_fused, err_reference)
    # every step, x and the x0 estimate (the guided one, written by the kernel)
    for (xf, x0f), (xr, x0r), (xe, x0e) in zip(
        traces[("triton", torch.float32)], traces[("torch", torch.float32)], traces[("torch", torch.float64)]
    ):
        for fused_value, reference_value, exact_value in ((xf, xr, xe), (x0f, x0r, x0e)):
            err_r = float((reference_value.double() - exact_value).abs().max())
            err_f = float((fused_value.double() - exact_value).abs().max())
            assert err_f <= RATIO * err_r + allowance + 1e-6, (err_f, err_r)
    assert len(traces[("triton", torch.float32)]) == len(traces[("torch", torch.float64)])


def test_fused_sampling_is_deterministic_and_independent_of_the_batch():
    """In-kernel noise is keyed by (seed, stream, draw, sample id): the same run twice gives the
    same samples bit for bit, and sample i is the same in a batch of 5 and of 2."""
    sampler = REGISTRY.build("sampler", "euler-ancestral", steps=STEPS)
    guide = REGISTRY.build("guidance", "cfg", scale=2.0)
    first = run(sampler, guide, "triton")
    assert torch.equal(run(sampler, guide, "triton"), first)
    assert torch.equal(run(sampler, guide, "triton", ids=IDS[2:4]), first[2:4])


def test_third_party_sampler_through_the_algebra_is_fused():
    """A sampler that writes its update as executor steps is fused without a kernel of its
    own: a plain DDIM written in a few lines gives the built-in ddim's samples on both
    backends."""

    class MyDDIM(fundiff.Sampler):
        def sample(self, denoise, x, levels, noise=None, callback=None):
            ex = fused.executor(x)
            for t, s in itertools.pairwise(levels):
                x0 = ex.predict(denoise, x, t)
                ratio = s.sigma / t.sigma
                x, x0 = ex.step(((ratio, x), (s.alpha - ratio * t.alpha, x0)), ((1.0, x0),))
            return x

    mine = MyDDIM(steps=STEPS)
    builtin = REGISTRY.build("sampler", "ddim", steps=STEPS)
    guide = REGISTRY.build("guidance", "cfg", scale=3.0)
    for backend in ("torch", "triton"):
        assert torch.allclose(run(mine, guide, backend), run(builtin, guide, backend), rtol=0, atol=1e-6)


def test_guidance_combine_is_deferred_only_on_the_fused_backend():
    """The torch backend calls the denoiser (the guidance combines as it always did: the
    reference path is unchanged); the triton backend receives the branches and weights."""
    guide = REGISTRY.build("guidance", "cfg", scale=3.0, rescale=0.5)
    levels = fundiff.noise_levels(REGISTRY.build("schedule", "cosine"), REGISTRY.build("chain", "vp"), 4)
    x = torch.randn(2, *SHAPE, device=DEVICE)
    denoise = make_denoise(
        ToyConditional(), REGISTRY.build("parameterization", "x0"), guide, torch.tensor([0, 1], device=DEVICE), levels
    )
    reference = fused.executor(x, "torch").predict(denoise, x, levels[1])
    deferred = fused.executor(x, "triton").predict(denoise, x, levels[1])
    assert isinstance(reference, torch.Tensor) and isinstance(deferred, fused.Prediction)
    assert deferred.weights == (3.0, -2.0) and deferred.rescale.phi == 0.5
    assert torch.equal(reference, denoise(x, levels[1]))
    assert torch.allclose(fused.resolve_prediction(deferred), reference, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------------------
# The pipeline, the recipe and the command line
# --------------------------------------------------------------------------------------


def conditional_pipeline(**sample) -> fundiff.Pipeline:
    recipe = oracle_recipe(
        data={"name": "gmm", "modes": 4, "radius": 2.0, "std": 0.5},
        denoiser={"name": "gmm-oracle", "conditional": True},
        guidance={"name": "cfg", "scale": 2.0},
        sampler={"name": "dpmpp-2m-sde", "steps": 10},
        sample={"device": str(DEVICE), **sample},
    )
    return fundiff.Pipeline(fundiff.load_recipe(recipe, REGISTRY))


def test_pipeline_backends_give_the_same_samples():
    """sample.backend picks the executor (the oracle's predictions reach the kernel as the
    CFG branches); batch size changes nothing. As above: the fused samples within RATIO times
    the float32 reference's error of the float64 samples, plus the noise allowance of the 10
    stochastic steps (dpmpp-2m-sde)."""
    p = conditional_pipeline(backend="triton")
    assert p.recipe.sample.backend == "triton" and p.recipe.to_dict()["sample"]["backend"] == "triton"
    fused_samples, labels = p.sample(12, seed=5, batch_size=5)
    reference, labels_ref = p.sample(12, seed=5, batch_size=12, backend="torch")
    exact, _ = p.sample(12, seed=5, batch_size=12, backend="torch", dtype=torch.float64)
    assert torch.equal(labels, labels_ref)
    err_reference = float((reference.double() - exact).abs().max())
    err_fused = float((fused_samples.double() - exact).abs().max())
    assert err_fused <= RATIO * err_reference + 10 * NOISE_ATOL, (err_fused, err_reference)


def test_pipeline_refuses_what_cannot_run(monkeypatch):
    """CUDA graphs need a CUDA device; an explicit triton backend that cannot run is an error
    naming the fix (here: CPU tensors without the interpreter)."""
    if DEVICE.type == "cuda":
        pytest.skip("checks the CPU-only refusals")
    p = conditional_pipeline()
    with pytest.raises(FundiffError, match="cuda_graphs needs a CUDA device"):
        p.sample(4, cuda_graphs=True)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(FundiffError, match="backend 'triton' cannot run"):
        p.sample(4, backend="triton")
    with pytest.raises(fundiff.RecipeError, match="sample.backend"):
        fundiff.load_recipe(oracle_recipe(sample={"backend": "cuda"}), REGISTRY)


def test_cli_backend_and_cuda_graphs_flags(tmp_path, monkeypatch, capsys):
    """fundiff sample --backend / --cuda-graphs reach sample.backend / sample.cuda_graphs: on a
    CPU-only machine both refusals come back as one-line user errors (exit status 2)."""
    if DEVICE.type == "cuda":
        pytest.skip("checks the CPU-only refusals")
    import yaml

    from fundiff import cli

    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(oracle_recipe()))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    run_dir = str(tmp_path / "run")
    assert cli.main(["train", str(recipe), "--run-dir", run_dir, "-q"]) == 0
    for flags, message in (
        (["--backend", "triton"], "backend 'triton' cannot run"),
        (["--cuda-graphs"], "cuda_graphs needs a CUDA device"),
    ):
        capsys.readouterr()
        assert cli.main(["sample", run_dir, "-n", "4", "-q", "--no-plot", *flags]) == 2
        err = capsys.readouterr().err
        assert err.startswith("fundiff: error: ") and message in err and err.count("\n") == 1, err


def test_kernel_benchmark_refuses_without_cuda_and_its_smoke_run_works(capsys):
    """benchmarks/kernels.py measures GPU kernels: without CUDA it exits with status 2 and
    says why; --smoke runs its code paths (agreement check included) at tiny sizes."""
    if DEVICE.type == "cuda":
        pytest.skip("the CPU-only refusal and interpreter smoke run (on a GPU, run the benchmark itself)")
    import importlib.util

    from helpers import ROOT

    spec = importlib.util.spec_from_file_location("kernels_benchmark", os.path.join(ROOT, "benchmarks", "kernels.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--only", "kernels"]) == 2
    assert "needs CUDA" in capsys.readouterr().err
    assert module.main(["--smoke", "--no-compile", "--only", "kernels"]) == 0
    assert "fused step disagrees" not in capsys.readouterr().out


@pytest.mark.parametrize("name, params", [("ddim", {"eta": 1.0}), ("unipc", {}), ("dpmpp-3m", {})])
def test_conformance_kit_checks_fused_agreement(name, params):
    """fundiff.testing.check_sampler_fused_agreement, the check plugin authors run on their
    own samplers: converted samplers pass, and so does one that does not use the executor
    (dpmpp-3m: plain torch arithmetic on either backend)."""
    from fundiff.testing import check_sampler_fused_agreement

    check_sampler_fused_agreement(REGISTRY.build("sampler", name, steps=STEPS, **params))
