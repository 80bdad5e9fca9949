"""The latent chain: an inner Gaussian chain run on the codes of an autoencoder (survey
sec. 3.2.3; latent diffusion, Rombach et al. 2022; LSGM, Vahdat et al. 2021).

Training has two stages, as in LDM: the autoencoder is trained first (``fit``: reconstruction
plus a small KL term, see ``fundiff_plugins/denoisers/_autoencoder.py``), then frozen, and the
denoiser learns the inner chain on its codes. The state the chain, the denoiser and the
noise streams see is the code (``state_spec``); ``encode`` maps data to codes (the encoder's
mean, times a scale factor) and ``decode`` maps the sampler's clean codes back to data.

Codes are rescaled to unit standard deviation (``scale_codes``): LDM's scale factor
(Rombach et al. 2022, sec. 4.3.2 and appendix G), 1 / std of all code elements of the
training data, computed once after the autoencoder is trained and stored with it, so the
inner chain's prior N(0, I) and its noise levels mean what they mean on unit-scale data.

The chain is a module (``build_module``); the autoencoder's weights and the scale live in
checkpoints under ``chain.``, and ``fit`` skips once fitted (on resume, or after loading).
"""

from __future__ import annotations

from typing import Any

import attrs
import torch

from fundiff import BuildContext, Chain, DataSpec, hookimpl
from fundiff.components import CORRUPTION_OPERATOR, GAUSSIAN_MARGINALS
from fundiff.config import doc
from fundiff.errors import FundiffError
from fundiff_plugins.chains._wrapping import InnerChainMath, WrappingChainModule
from fundiff_plugins.chains.vp import VariancePreserving
from fundiff_plugins.denoisers._autoencoder import Autoencoder
from fundiff_plugins.denoisers.mlp_autoencoder import MLPAutoencoder

#: Philox stream ids of the autoencoder's training (batch rows, then code noise on 1421)
STREAM_AUTOENCODER = 1420
#: rows encoded at a time when the code scale is measured
_ENCODE_CHUNK = 8192


class _CodeData:
    """The recipe's data set as the other components would see it if it were the codes:
    ``spec()`` is the code spec, everything else the real data set's (for ``check_recipe``)."""

    def __init__(self, data: Any, code_spec: DataSpec):
        self._data, self._code_spec = data, code_spec

    def spec(self) -> DataSpec:
        return self._code_spec

    def __getattr__(self, name: str) -> Any:
        return getattr(self._data, name)


@attrs.frozen(kw_only=True)
class Latent(InnerChainMath):
    """An inner Gaussian chain on autoencoder codes: the autoencoder trains first, sampling decodes."""

    provides = frozenset({GAUSSIAN_MARGINALS})

    inner: Chain = attrs.field(factory=VariancePreserving, metadata=doc("the chain run on the codes (a nested chain section)"))
    autoencoder: Autoencoder = attrs.field(
        factory=MLPAutoencoder, metadata=doc("the autoencoder (a nested section naming one, e.g. mlp-autoencoder)")
    )
    scale_codes: bool = attrs.field(
        default=True, metadata=doc("rescale codes to unit standard deviation after the autoencoder trains (LDM's scale factor)")
    )

    def check_recipe(self, components) -> list[str]:
        inner = type(self.inner)
        if GAUSSIAN_MARGINALS not in inner.provides:
            return [
                (
                    f"chain 'latent' diffuses continuous codes with a Gaussian chain (it requires 'gaussian-marginals'), but "
                    f"its inner chain {inner.__name__} does not provide it; use inner: vp or inner: ve"
                )
            ]
        problems = []
        data = components.get("data")
        if data is None:
            return problems
        spec = data.spec()
        if self.inner.build_module(spec) is not None:
            problems.append(
                f"chain 'latent' runs a chain without fitted state on the codes, but its inner chain {inner.__name__} "
                "fits its own; use inner: vp or inner: ve"
            )
        problems += self.inner.check_recipe(components)
        codes = self.autoencoder.code_spec(spec)
        shape = "x".join(str(s) for s in codes.shape)
        denoiser = components.get("denoiser")
        if denoiser is not None and not type(denoiser).trainable:
            problems.append(
                f"chain 'latent': denoiser {type(denoiser).__name__} is closed-form for the data's own distribution, "
                "but the latent chain diffuses autoencoder codes; use a trainable denoiser such as mlp"
            )
        noise = components.get("noise")
        if noise is not None and (CORRUPTION_OPERATOR in type(noise).provides or type(noise).needs_data):
            problems.append(
                f"chain 'latent': noise {type(noise).__name__} acts on the data's own elements or may be estimated from "
                f"them, but the latent chain's state is {shape} codes; use noise: gaussian"
            )
        # every other component, checked again as if the codes were the data: what it refuses
        # only then is a code shape it cannot serve (an image network on code vectors, ...)
        as_codes = {**components, "data": _CodeData(data, codes)}
        for kind, component in components.items():
            if kind in ("chain", "data") or component is None:
                continue
            on_data = set(component.check_recipe(dict(components)))
            for message in component.check_recipe(as_codes):
                if message not in on_data:
                    problems.append(f"chain 'latent' gives the {kind} codes of shape ({shape}) instead of the data: {message}")
        return problems

    def state_spec(self, spec: DataSpec) -> DataSpec:
        return self.autoencoder.code_spec(spec)

    def build_module(self, spec: DataSpec) -> LatentModule:
        return LatentModule(self, spec)

    def encode(self, x0: torch.Tensor) -> torch.Tensor:
        raise FundiffError("chain 'latent' encodes with its trained autoencoder: use the pipeline's chain (chain.build_module)")

    def decode(self, state: torch.Tensor) -> torch.Tensor:
        raise FundiffError("chain 'latent' decodes with its trained autoencoder: use the pipeline's chain (chain.build_module)")


class LatentModule(WrappingChainModule):
    """The latent chain with its autoencoder (a module; the pipeline uses it as the chain)."""

    def __init__(self, config: Latent, spec: DataSpec):
        super().__init__(config, spec)
        self.code_spec = config.autoencoder.code_spec(spec)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.autoencoder.seed)  # initial weights depend on the autoencoder's seed alone
            self.autoencoder = config.autoencoder.build(BuildContext(spec=spec, components={}))
        self.autoencoder.requires_grad_(False)  # frozen outside fit: the denoiser's optimizer never sees it
        self.register_buffer("code_scale", torch.ones((), dtype=torch.float64))
        self.losses: list[float] = []  # the autoencoder's training losses of the last fit (not saved)

    def state_spec(self, spec: DataSpec) -> DataSpec:
        return self.code_spec

    # ---------------------------------------------------------------- data <-> codes

    def _unscaled_codes(self, x: torch.Tensor) -> torch.Tensor:
        weight = next(self.autoencoder.parameters())
        mean, _ = self.autoencoder.encode(x.to(weight.device, weight.dtype))
        return mean

    @torch.no_grad()
    def encode(self, x0: torch.Tensor) -> torch.Tensor:
        """Codes of data: the encoder's mean times the stored scale (a constant for the denoiser)."""
        self._check_fitted()
        return (self._unscaled_codes(x0) * self.code_scale).to(x0.dtype)

    @torch.no_grad()
    def decode(self, state: torch.Tensor) -> torch.Tensor:
        """Data from clean codes: the decoder applied to codes divided by the scale."""
        self._check_fitted()
        weight = next(self.autoencoder.parameters())
        z = (state.to(torch.float64) / self.code_scale).to(weight.device, weight.dtype)
        return self.autoencoder.decode(z).to(state.dtype)

    def _check_fitted(self) -> None:
        if not bool(self.fitted):
            raise FundiffError(
                "chain 'latent': the autoencoder is not trained; train the recipe (fundiff train trains it before the "
                "denoiser) or call pipeline.chain.fit(pipeline)"
            )

    def fit(self, pipeline) -> None:
        """Train the autoencoder on the data set, then measure the code scale; once (a
        fitted module, e.g. loaded from a checkpoint, skips)."""
        if bool(self.fitted):
            return
        weight = next(self.autoencoder.parameters())
        x = pipeline.data.x.to(weight.device, weight.dtype)
        self.autoencoder.requires_grad_(True)
        try:
            self.losses = self.config.autoencoder.fit(self.autoencoder, x, self.code_spec.shape, STREAM_AUTOENCODER)
        finally:
            self.autoencoder.requires_grad_(False)
        if self.config.scale_codes:
            with torch.no_grad():
                codes = torch.cat([self._unscaled_codes(chunk) for chunk in x.split(_ENCODE_CHUNK)]).to(torch.float64)
            # LDM's scale factor: 1 / std of every code element of the training data
            self.code_scale.fill_(1.0 / float(codes.flatten().std().clamp(min=1e-12)))
        self.fitted.fill_(True)


@hookimpl
def fundiff_register_chains(register):
    register("latent", Latent)
