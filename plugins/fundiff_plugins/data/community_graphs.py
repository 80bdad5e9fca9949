"""Two-community random graphs (a planted-partition stochastic block model), as dense
adjacency matrices: the toy data set of the ``graph-transformer`` denoiser.

Each graph has ``nodes`` nodes split into two communities of sizes floor(N/2) and
ceil(N/2); each unordered pair {i, j} is an edge independently with probability ``p_in``
inside a community and ``p_out`` between them. The nodes are then put in a random order per
graph, so the planted partition cannot be read off the node index and a network that treats
nodes as a set (permutation-equivariant) has the right inductive bias.

An example is the (1, N, N) matrix with +1 for an edge, -1 for no edge and 0 on the
diagonal: symmetric, and shaped like a one-channel image so that ``fundiff sample`` draws
the sampled adjacency matrices as a picture grid (modality ``images``).
"""

from __future__ import annotations

import attrs
import torch

from fundiff import Data, DataSet, DataSpec, hookimpl, rng
from fundiff.config import at_least, doc, in_range


@attrs.frozen(kw_only=True)
class CommunityGraphs(DataSet):
    """Undirected two-community graphs (stochastic block model), nodes in random order, as
    +-1 adjacency matrices with a zero diagonal."""

    n: int = attrs.field(default=5000, validator=at_least(1), metadata=doc("number of graphs"))
    nodes: int = attrs.field(
        default=12, validator=at_least(2), metadata=doc("nodes per graph (two communities of floor/ceil N/2)")
    )
    p_in: float = attrs.field(default=0.7, validator=in_range(0.0, 1.0), metadata=doc("edge probability inside a community"))
    p_out: float = attrs.field(
        default=0.05, validator=in_range(0.0, 1.0), metadata=doc("edge probability between the communities")
    )
    seed: int = attrs.field(default=0, validator=at_least(0), metadata=doc("seed of the drawn edges and node orders"))

    def spec(self) -> DataSpec:
        return DataSpec(shape=(1, self.nodes, self.nodes), num_classes=0, modality="images")

    def draw(self, n: int, seed: int, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """n graphs from per-graph Philox streams: (adjacency (n, N, N) float64 in {0, 1}
        with a zero diagonal, community (n, N) int64 in {0, 1} of each node in its shown
        order)."""
        size = self.nodes
        ids = torch.arange(offset, offset + n)
        upper_i, upper_j = torch.triu_indices(size, size, offset=1)
        # community of the node at planted position k: the first floor(N/2) positions are 0
        planted = (torch.arange(size) >= size // 2).long()
        same = planted[upper_i] == planted[upper_j]
        probability = torch.where(
            same, torch.tensor(self.p_in, dtype=torch.float64), torch.tensor(self.p_out, dtype=torch.float64)
        )
        u_edges = rng.uniform(seed, rng.STREAM_DATA, 0, ids, (upper_i.numel(),))
        edges = (u_edges < probability).double()
        adjacency = torch.zeros(n, size, size, dtype=torch.float64)
        adjacency[:, upper_i, upper_j] = edges
        adjacency = adjacency + adjacency.transpose(1, 2)
        # random node order per graph: sorting i.i.d. uniforms gives a uniform permutation
        order = torch.argsort(rng.uniform(seed, rng.STREAM_DATA, 1, ids, (size,)), dim=1)
        rows = torch.arange(n)[:, None, None]
        shown = adjacency[rows, order[:, :, None], order[:, None, :]]  # A'[k, l] = A[order_k, order_l]
        return shown, planted[order]

    def load(self) -> Data:
        adjacency, _ = self.draw(self.n, self.seed)
        eye = torch.eye(self.nodes, dtype=torch.bool)
        # edge +1, no edge -1, diagonal 0 (no self-loops: a value the data never varies)
        x = torch.where(eye, torch.zeros_like(adjacency), 2 * adjacency - 1)
        return Data(x=x[:, None].float(), labels=None, spec=self.spec())


@hookimpl
def fundiff_register_data(register):
    register("community-graphs", CommunityGraphs)
