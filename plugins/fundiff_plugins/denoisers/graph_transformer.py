"""A graph transformer (survey sec. 4.1.2; Dwivedi and Bresson 2021, "A Generalization of
Transformer Networks to Graphs"), for noisy dense adjacency matrices (1, N, N), as in
DiGress (Vignac et al. 2023) but on the continuous Gaussian chains.

Permutation equivariance. Relabelling the nodes by a permutation P maps the data
X -> P X P^T, and the network satisfies f(P X P^T) = P f(X) P^T exactly (up to the rounding
of sums taken in another order): nodes carry no position embedding, every node quantity is
a mean over the other nodes, and every edge quantity is built from the edge itself and a
symmetric function of its two ends.

Inputs. The data is symmetric with a zero diagonal, so of the noisy x only the symmetric
part s = (x + x^T) / 2 off the diagonal carries information about x0; the antisymmetric
part a = (x - x^T) / 2 and the diagonal d are pure noise. Each edge starts as an embedding
of s_ij; each node as the mean over j != i of another embedding of s_ij (a DeepSets
reduction of its row, invariant to the order of the other nodes).

Layers (Dwivedi and Bresson's layer with edge features, eqs. 11-12, with the noise level
as FiLM conditioning): multi-head self-attention over the nodes whose logits get a per-head
bias computed from the edge state, q_i k_j / sqrt(d) + b_h(e_ij); a feed-forward block; an
edge update e_ij += MLP(e_ij, h_i + h_j, h_i * h_j), symmetric in i and j. The noise level
enters as the sinusoidal logSNR embedding of ``_layers.NoiseEmbedding``, shifting and
scaling the LayerNorms of every block.

Readout. Off the diagonal, out_ij = MLP(e_ij, h_i + h_j, h_i * h_j): symmetric. On the pure-
noise components (a and d) the ideal output of every Gaussian parameterization is linear
in x with a gain that depends only on the noise level (eps: 1/sigma; v: alpha/sigma; x0:
0; on a VP chain with input scale 1), so the output adds g(lambda) (a + diag d) with a
learned log-gain g; for symmetric input with a zero diagonal the output is symmetric with a
zero diagonal. ``learned_variance: true`` adds a second output channel (a symmetric edge
head and a per-node diagonal head) read as improved DDPM's v (``_variance.py``).
"""

from __future__ import annotations

import math

import attrs
import torch
from torch import nn

from fundiff import BuildContext, DataSpec, Denoiser, hookimpl
from fundiff.config import at_least, doc, greater_than
from fundiff.errors import FundiffError

from ._layers import FeedForward, NoiseEmbedding, VarianceOutput, xavier_linears
from .mlp import LOGSNR_CLAMP


def adjacency_problem(spec: DataSpec) -> str | None:
    """None when the data is (1, N, N) adjacency matrices with N >= 2, else the refusal."""
    shape = tuple(spec.shape)
    if len(shape) == 3 and shape[0] == 1 and shape[1] == shape[2] and shape[1] >= 2:
        return None
    return (
        f"denoiser 'graph-transformer' needs adjacency matrices of shape (1, N, N) with N >= 2 (e.g. data "
        f"'community-graphs'), but the data has shape {shape}; use denoiser 'mlp' for data that is not a graph"
    )


def film(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class PairMLP(nn.Module):
    """MLP(e_ij, h_i + h_j, h_i * h_j), symmetric in i and j when e is (the sum and product
    of the two node states are symmetric functions of the pair). The first layer is split so
    that node terms are projected once per node, not once per edge:
    W_e e_ij + W_s h_i + W_s h_j + (U h_i) * (U h_j)."""

    def __init__(self, node_dim: int, edge_dim: int, out: int):
        super().__init__()
        self.norm = nn.LayerNorm(edge_dim)
        self.edge_in = nn.Linear(edge_dim, edge_dim)
        self.node_sum = nn.Linear(node_dim, edge_dim, bias=False)
        self.node_product = nn.Linear(node_dim, edge_dim, bias=False)
        self.net = nn.Sequential(nn.SiLU(), nn.Linear(edge_dim, out))

    def forward(self, e: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        summed, product = self.node_sum(h), self.node_product(h)
        first = self.edge_in(self.norm(e)) + summed[:, :, None] + summed[:, None, :] + product[:, :, None] * product[:, None, :]
        return self.net(first)


class GraphTransformerLayer(nn.Module):
    def __init__(self, dim: int, edge_dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.edge_bias = nn.Sequential(nn.LayerNorm(edge_dim), nn.Linear(edge_dim, heads))  # b_h(e_ij), one per head
        self.out = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False)
        self.ff = FeedForward(dim, mlp_ratio)
        self.edge_update = PairMLP(dim, edge_dim, edge_dim)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 4 * dim))

    def forward(self, h: torch.Tensor, e: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch, n, dim = h.shape
        shift1, scale1, shift2, scale2 = self.modulation(c)[:, None, :].chunk(4, dim=2)
        q, k, v = (
            self.qkv(film(self.norm1(h), shift1, scale1))
            .reshape(batch, n, 3, self.heads, dim // self.heads)
            .permute(2, 0, 3, 1, 4)
        )
        # Dwivedi and Bresson eq. 11: attention logits of node i to node j, biased by edge ij
        logits = q @ k.transpose(-1, -2) / math.sqrt(dim // self.heads) + self.edge_bias(e).permute(0, 3, 1, 2)
        attended = (logits.softmax(dim=-1) @ v).transpose(1, 2).reshape(batch, n, dim)
        h = h + self.out(attended)
        h = h + self.ff(film(self.norm2(h), shift2, scale2))
        return h, e + self.edge_update(e, h)


class GraphTransformerModel(VarianceOutput):
    def __init__(self, config: GraphTransformer, nodes: int):
        super().__init__()
        self.learned_variance = config.learned_variance
        dim, edge_dim = config.width, config.edge_width
        self.nodes = nodes
        self.edge_embed = nn.Sequential(nn.Linear(2, edge_dim), nn.SiLU(), nn.Linear(edge_dim, edge_dim))
        self.node_embed = nn.Sequential(nn.Linear(2, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.cycle_embed = nn.Linear(1, dim)
        self.noise_embedding = NoiseEmbedding(config.embed_dim, config.max_period, dim)
        self.layers = nn.ModuleList(
            GraphTransformerLayer(dim, edge_dim, config.heads, config.mlp_ratio) for _ in range(config.depth)
        )
        self.final_norm = nn.LayerNorm(dim)
        self.edge_readout = PairMLP(dim, edge_dim, self.out_factor)
        # log of the gain on the pure-noise components; lambda enters linearly as well
        # because the ideal gains are exponential in it (alpha / sigma = exp(lambda / 2))
        self.log_gain = nn.Sequential(nn.Linear(dim + 1, dim), nn.SiLU(), nn.Linear(dim, 1))
        self.diagonal_variance = nn.Linear(dim, 1) if self.learned_variance else None
        xavier_linears(self)
        for layer in (self.edge_readout.net[-1], *(block.out for block in self.layers)):
            nn.init.zeros_(layer.weight)  # residual branches and the readout start at zero
            nn.init.zeros_(layer.bias)

    def network(self, x: torch.Tensor, logsnr: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        n = x.shape[-1]
        matrix = x[:, 0]
        symmetric = (matrix + matrix.transpose(1, 2)) / 2
        antisymmetric = (matrix - matrix.transpose(1, 2)) / 2
        off_diagonal = 1.0 - torch.eye(n, device=x.device, dtype=x.dtype)
        # structural features of the noisy graph, as DiGress adds to its graph transformer:
        # walks of length 2 between i and j (common neighbours, (s^2)_ij) and closed walks
        # of length 3 through i ((s^3)_ii, triangles); matrix powers commute with relabelling
        s = symmetric * off_diagonal
        two_walks = (s @ s) / (n - 1)
        three_walks = torch.diagonal(two_walks @ s, dim1=1, dim2=2) / (n - 1)
        # e_ij from (s_ij, (s^2)_ij); h_i = mean over j != i of an embedding of the same pair
        # (DeepSets on the row) plus an embedding of (s^3)_ii
        pair = torch.stack([s, two_walks], dim=-1)
        e = self.edge_embed(pair)
        h = (self.node_embed(pair) * off_diagonal[None, :, :, None]).sum(2) / (n - 1) + self.cycle_embed(three_walks[..., None])
        c = self.noise_embedding(logsnr, x.dtype)
        for layer in self.layers:
            h, e = layer(h, e, c)
        h = self.final_norm(h)
        edges = self.edge_readout(e, h) * off_diagonal[None, :, :, None]  # (B, N, N, out_factor)
        level = logsnr.to(x.dtype).clamp(-LOGSNR_CLAMP, LOGSNR_CLAMP)[:, None]
        gain = torch.exp(self.log_gain(torch.cat([c, level / 2], dim=1)))[:, :, None]  # (B, 1, 1)
        noise_part = antisymmetric + torch.diag_embed(torch.diagonal(matrix, dim1=1, dim2=2))
        channels = [edges[..., 0] + gain * noise_part]
        if self.learned_variance:
            channels.append(edges[..., 1] + torch.diag_embed(self.diagonal_variance(h)[..., 0]))
        return torch.stack(channels, dim=1)  # (B, out_factor, N, N): VarianceOutput splits it


@attrs.frozen(kw_only=True)
class GraphTransformer(Denoiser):
    """Node-permutation-equivariant graph transformer over noisy (1, N, N) adjacency
    matrices: edge-biased attention, symmetric edge updates and readout."""

    width: int = attrs.field(default=64, validator=at_least(1), metadata=doc("node token width"))
    edge_width: int = attrs.field(default=32, validator=at_least(1), metadata=doc("edge feature width"))
    depth: int = attrs.field(default=3, validator=at_least(1), metadata=doc("number of graph transformer layers"))
    heads: int = attrs.field(default=4, validator=at_least(1), metadata=doc("attention heads; must divide width"))
    mlp_ratio: float = attrs.field(
        default=2.0, validator=greater_than(0.0), metadata=doc("feed-forward hidden width over node width")
    )
    embed_dim: int = attrs.field(default=64, validator=at_least(2), metadata=doc("size of the sinusoidal logSNR embedding"))
    max_period: float = attrs.field(
        default=1000.0, validator=greater_than(1.0), metadata=doc("longest period of the embedding, in logSNR units")
    )
    learned_variance: bool = attrs.field(
        default=False, metadata=doc("a second output channel that feeds a learned reverse variance (improved DDPM)")
    )

    def __attrs_post_init__(self) -> None:
        if self.width % self.heads:
            raise ValueError(f"heads {self.heads} must divide width {self.width}")

    def check_recipe(self, components) -> list[str]:
        data = components.get("data")
        if data is None:
            return []
        try:
            spec = data.spec()
        except Exception:  # noqa: BLE001 - the data component reports its own problems
            return []
        problem = adjacency_problem(spec)
        return [problem] if problem else []

    def build(self, context: BuildContext) -> nn.Module:
        problem = adjacency_problem(context.spec)
        if problem:
            raise FundiffError(problem)
        return GraphTransformerModel(self, context.spec.shape[-1])


@hookimpl
def fundiff_register_denoisers(register):
    register("graph-transformer", GraphTransformer)
