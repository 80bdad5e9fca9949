"""An MLP autoencoder for the ``latent`` chain: data of any shape, flattened, to a code
vector of ``latent_dim`` numbers and back (survey sec. 3.2.3; the first stage of latent
diffusion, Rombach et al. 2022, here as a small MLP for points and small images).

Nest it in the chain section, never as the recipe's denoiser::

    chain: {name: latent, inner: {name: vp}, autoencoder: {name: mlp-autoencoder, latent_dim: 2}}
"""

from __future__ import annotations

import attrs
import torch
from torch import nn

from fundiff import BuildContext, DataSpec, hookimpl
from fundiff.config import at_least, doc

from ._autoencoder import Autoencoder, AutoencoderNetwork


def _mlp(inputs: int, width: int, depth: int, outputs: int) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Linear(inputs, width), nn.SiLU()]
    for _ in range(depth - 1):
        layers += [nn.Linear(width, width), nn.SiLU()]
    return nn.Sequential(*layers, nn.Linear(width, outputs))


class MLPAutoencoderNetwork(AutoencoderNetwork):
    def __init__(self, data_shape: tuple[int, ...], latent_dim: int, width: int, depth: int):
        super().__init__()
        self.data_shape = tuple(data_shape)
        numel = 1
        for size in self.data_shape:
            numel *= size
        self.encoder = _mlp(numel, width, depth, 2 * latent_dim)
        self.decoder = _mlp(latent_dim, width, depth, numel)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, log_var = self.encoder(x.flatten(1)).chunk(2, dim=1)
        return mean, log_var

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z).reshape(z.shape[0], *self.data_shape)


@attrs.frozen(kw_only=True)
class MLPAutoencoder(Autoencoder):
    """MLP encoder and decoder (SiLU) between the flattened data and a latent_dim code vector."""

    latent_dim: int = attrs.field(default=2, validator=at_least(1), metadata=doc("length of the code vector"))
    width: int = attrs.field(default=128, validator=at_least(1), metadata=doc("width of the hidden layers"))
    depth: int = attrs.field(default=2, validator=at_least(1), metadata=doc("hidden layers of the encoder and of the decoder"))

    def code_spec(self, spec: DataSpec) -> DataSpec:
        return DataSpec(shape=(self.latent_dim,), num_classes=spec.num_classes, modality="points")

    def build(self, context: BuildContext) -> MLPAutoencoderNetwork:
        return MLPAutoencoderNetwork(context.spec.shape, self.latent_dim, self.width, self.depth)


@hookimpl
def fundiff_register_denoisers(register):
    register("mlp-autoencoder", MLPAutoencoder)
