"""Mimi's split residual vector quantizer: 1 semantic codebook + 31 acoustic ones, 2048 entries of dim 256.

Each half projects the 512-d latent to 256 with its own 1x1 projection, quantizes it residually (each level
takes the nearest entry to what the previous levels left) and projects back; the decoded latent is the sum
of both halves. Both halves read the same latent: the acoustic half does not see the semantic residual.

A codebook keeps the training-time EMA buffers of the release (`embedding_sum`, `cluster_usage`,
`initialized`); its vectors are embedding_sum / cluster_usage.clamp(min=1e-5), computed once for all codebooks
(`CodebookTables`) and reused until a buffer changes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn



def _version(t: torch.Tensor) -> int | None:
    try:
        return t._version
    except RuntimeError:  # inference tensors have no version counter: never cache
        return None


class Codebook(nn.Module):
    """The training-time EMA buffers of one codebook; `vectors()` are the codebook entries derived from them."""

    def __init__(self, dim: int, size: int, eps: float = 1e-5, device=None, dtype=None) -> None:
        super().__init__()
        self.dim, self.size, self.eps = dim, size, eps
        self.register_buffer("initialized", torch.zeros(1, device=device, dtype=dtype))
        self.register_buffer("cluster_usage", torch.ones(size, device=device, dtype=dtype))
        self.register_buffer("embedding_sum", torch.zeros(size, dim, device=device, dtype=dtype))

    def cache_key(self) -> tuple:
        s, u = self.embedding_sum, self.cluster_usage
        return (s.data_ptr(), _version(s), u.data_ptr(), _version(u), s.device, s.dtype)

    def vectors(self) -> torch.Tensor:
        """(size, dim) codebook entries."""
        return self.embedding_sum / self.cluster_usage.clamp(min=self.eps)[:, None]


class CodebookTables:
    """Every codebook's entries stacked, (total, size, dim), and their squared norms (total, size).

    Computed once and reused while no codebook buffer changes (e.g. a new checkpoint is loaded), so a step
    reads them instead of recomputing 32 divisions; they are the only copy of the entries.
    """

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._tables: tuple[torch.Tensor, torch.Tensor] | None = None

    def get(self, codebooks: list[Codebook]) -> tuple[torch.Tensor, torch.Tensor]:
        key = tuple(cb.cache_key() for cb in codebooks)
        if self._tables is not None and key == self._key and not any(None in k for k in key):
            return self._tables
        with torch.no_grad(), torch.inference_mode(False):
            table = torch.stack([cb.vectors() for cb in codebooks])
            sq_norms = table.pow(2).sum(-1)
        self._tables, self._key = (table, sq_norms), key
        return table, sq_norms


def nearest(rows: torch.Tensor, vectors: torch.Tensor, sq_norms: torch.Tensor) -> torch.Tensor:
    """rows (N, dim) -> (N,) int64 index of the nearest of `vectors` (size, dim) in euclidean distance.

    argmin_e |x - e|^2 = argmin_e (|e|^2 - 2 x.e): |x|^2 is the same for every entry and the square root is
    monotonic, so one matrix product and an argmin pick the entry `torch.cdist` (the reference) would.
    """
    return torch.addmm(sq_norms, rows, vectors.t(), alpha=-2).argmin(dim=1)


class ResidualVQ(nn.Module):
    def __init__(
        self, input_dim: int, dim: int, size: int, num_codebooks: int, eps: float = 1e-5, device=None, dtype=None
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.input_proj = nn.Linear(input_dim, dim, bias=False, **factory)
        self.output_proj = nn.Linear(dim, input_dim, bias=False, **factory)
        self.codebooks = nn.ModuleList(Codebook(dim, size, eps, **factory) for _ in range(num_codebooks))

    def encode(self, rows: torch.Tensor, n: int, table: torch.Tensor, sq_norms: torch.Tensor) -> list[torch.Tensor]:
        """rows (N, input_dim) -> n codes (N,) from the first n codebooks; `table`/`sq_norms` are theirs."""
        residual = F.linear(rows, self.input_proj.weight)
        codes = []
        for i in range(n):
            c = nearest(residual, table[i], sq_norms[i])
            if i + 1 < n:
                residual = residual - F.embedding(c, table[i])
            codes.append(c)
        return codes


class SplitResidualVQ(nn.Module):
    def __init__(
        self,
        input_dim: int,
        dim: int,
        size: int,
        total_codebooks: int,
        semantic_codebooks: int,
        num_codebooks: int,
        eps: float = 1e-5,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if not 0 < semantic_codebooks < total_codebooks:
            raise ValueError(f"need 0 < semantic_codebooks ({semantic_codebooks}) < total ({total_codebooks})")
        factory = {"device": device, "dtype": dtype}
        self.semantic = ResidualVQ(input_dim, dim, size, semantic_codebooks, eps, **factory)
        self.acoustic = ResidualVQ(input_dim, dim, size, total_codebooks - semantic_codebooks, eps, **factory)
        self.total_codebooks, self.semantic_codebooks, self.cardinality = total_codebooks, semantic_codebooks, size
        self.num_codebooks = 0
        self.set_num_codebooks(num_codebooks)
        self._tables = CodebookTables()

    def set_num_codebooks(self, n: int) -> None:
        if not self.semantic_codebooks <= n <= self.total_codebooks:
            raise ValueError(f"num_codebooks must be in [{self.semantic_codebooks}, {self.total_codebooks}], got {n}")
        self.num_codebooks = n

    def tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(entries (total, size, dim), squared norms (total, size)) of all codebooks, semantic first."""
        return self._tables.get([*self.semantic.codebooks, *self.acoustic.codebooks])

    def encode(self, latent: torch.Tensor) -> torch.Tensor:
        """latent (B, input_dim, F) -> codes (B, num_codebooks, F) int64."""
        B, D, T = latent.shape
        rows = latent.transpose(1, 2).reshape(B * T, D)
        table, sq_norms = self.tables()
        s = self.semantic_codebooks
        codes = self.semantic.encode(rows, s, table[:s], sq_norms[:s])
        rest = self.num_codebooks - s
        if rest > 0:
            codes += self.acoustic.encode(rows, rest, table[s:], sq_norms[s:])
        return torch.stack(codes, dim=1).view(B, T, -1).transpose(1, 2)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, K, F) with K <= total_codebooks -> latent (B, input_dim, F).

        One lookup in the stacked table for all K codebooks (code + k * size), one sum over the acoustic
        ones, and the two output projections.
        """
        B, K, T = codes.shape
        table, _ = self.tables()
        s = self.semantic_codebooks
        flat = table.view(-1, table.shape[-1])[: K * self.cardinality]
        offsets = torch.arange(0, K * self.cardinality, self.cardinality, device=codes.device)
        vectors = F.embedding(codes + offsets.view(1, K, 1), flat)  # (B, K, T, dim)
        rows = F.linear(vectors[:, :s].sum(1).reshape(B * T, -1), self.semantic.output_proj.weight)
        if K > s:
            rest = vectors[:, s:].sum(1).reshape(B * T, -1)
            rows = torch.addmm(rows, rest, self.acoustic.output_proj.weight.t())
        return rows.view(B, T, -1).transpose(1, 2)
