"""The autoencoder protocol of the ``latent`` chain (latent diffusion, Rombach et al. 2022;
survey sec. 3.2.3).

An autoencoder is registered through the denoiser hook (its networks are built like a
denoiser's, from a :class:`fundiff.BuildContext` whose spec is the data's) and nested in the
latent chain's ``autoencoder`` section; it is never a recipe's own denoiser. A subclass
says what its codes look like (``code_spec``) and builds an :class:`AutoencoderNetwork`;
this base trains it (``fit``) with

    loss = mean_elements (x - decode(z))^2 + kl_weight * KL(q(z | x) || N(0, I)),
    z = m(x) + exp(log_var(x) / 2) eps,

a reconstruction error plus a small KL regulariser, as in LDM's "KL-reg" first stage
(Rombach et al. 2022, sec. 3 and appendix G), which keeps the codes near the origin and
smooth without bounding their detail. The codes the diffusion model sees are the encoder's
means m(x) (deterministic).
"""

from __future__ import annotations

import abc

import attrs
import torch
from torch import nn

from fundiff import BuildContext, DataSpec, Denoiser, rng
from fundiff.config import at_least, doc, greater_than, in_range


class AutoencoderNetwork(nn.Module):
    """What ``Autoencoder.build`` returns: ``encode(x)`` gives the code distribution's
    ``(mean, log_variance)``, each (B, *code shape), and ``decode(z)`` the data (B, *data shape)."""

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


@attrs.frozen(kw_only=True)
class Autoencoder(Denoiser):
    """Base of the latent chain's autoencoders: training settings shared by every one."""

    steps: int = attrs.field(default=2000, validator=at_least(1), metadata=doc("Adam steps of the autoencoder's training"))
    batch_size: int = attrs.field(default=256, validator=at_least(1), metadata=doc("batch size of its training"))
    lr: float = attrs.field(default=2e-3, validator=greater_than(0.0), metadata=doc("Adam learning rate"))
    kl_weight: float = attrs.field(
        default=1e-3, validator=at_least(0.0), metadata=doc("weight of KL(q(z | x) || N(0, I)) against the reconstruction MSE")
    )
    seed: int = attrs.field(
        default=0, validator=in_range(0, 2**63), metadata=doc("seed of its initial weights, batches and code noise")
    )

    @abc.abstractmethod
    def code_spec(self, spec: DataSpec) -> DataSpec:
        """The spec of the codes of data with ``spec`` (what the diffusion model sees)."""

    @abc.abstractmethod
    def build(self, context: BuildContext) -> AutoencoderNetwork: ...

    def check_recipe(self, components) -> list[str]:
        if components.get("denoiser") is self:
            name = type(self).__name__
            return [
                (
                    f"{name} is an autoencoder for the latent chain, not a denoiser: nest it as "
                    "chain: {name: latent, autoencoder: {name: ...}} and pick a denoiser such as mlp"
                )
            ]
        return []

    def loss(self, network: AutoencoderNetwork, x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """(B,) training loss: reconstruction MSE (mean over elements) plus ``kl_weight``
        times KL(N(m, diag v) || N(0, I)) = sum (m^2 + v - 1 - log v) / 2 over code elements."""
        mean, log_var = network.encode(x)
        z = mean + torch.exp(0.5 * log_var) * eps
        reconstruction = ((network.decode(z) - x) ** 2).flatten(1).mean(1)
        kl = 0.5 * (mean**2 + torch.exp(log_var) - 1.0 - log_var).flatten(1).sum(1)
        return reconstruction + self.kl_weight * kl

    def fit(self, network: AutoencoderNetwork, x: torch.Tensor, code_shape: tuple[int, ...], stream: int) -> list[float]:
        """Train ``network`` on the rows of ``x`` for ``steps`` Adam steps; returns the losses.

        Batch rows and the code noise eps are Philox draws keyed by (seed, stream, step) and
        (seed, stream + 1, step), so the result depends only on the inputs."""
        device = next(network.parameters()).device
        optimizer = torch.optim.Adam(network.parameters(), lr=self.lr)
        positions = torch.arange(self.batch_size)
        losses = []
        network.train()
        with torch.enable_grad():
            for step in range(self.steps):
                rows = (rng.uniform(self.seed, stream, step, positions) * x.shape[0]).long().clamp(max=x.shape[0] - 1)
                eps = rng.normal(self.seed, stream + 1, step, positions, code_shape).to(device, x.dtype)
                loss = self.loss(network, x[rows.to(x.device)].to(device), eps).mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(float(loss.detach()))
        network.eval()
        return losses
