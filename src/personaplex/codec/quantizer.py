"""Mimi's split residual vector quantizer: 1 semantic codebook + 31 acoustic ones, 2048 entries of dim 256.

Each half projects the 512-d latent to 256 with its own 1x1 projection, quantizes it residually (each level
takes the nearest entry to what the previous levels left) and projects back; the decoded latent is the sum
of both halves. Both halves read the same latent: the acoustic half does not see the semantic residual.

A codebook keeps the training-time EMA buffers of the release (`embedding_sum`, `cluster_usage`,
`initialized`); its vectors are embedding_sum / cluster_usage.clamp(min=1e-5), computed once and cached until
a buffer changes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .conv import linear_rows, small_matmul


def _version(t: torch.Tensor) -> int | None:
    try:
        return t._version
    except RuntimeError:  # inference tensors have no version counter: never cache
        return None


class Codebook(nn.Module):
    def __init__(self, dim: int, size: int, eps: float = 1e-5, device=None, dtype=None) -> None:
        super().__init__()
        self.dim, self.size, self.eps = dim, size, eps
        self.register_buffer("initialized", torch.zeros(1, device=device, dtype=dtype))
        self.register_buffer("cluster_usage", torch.ones(size, device=device, dtype=dtype))
        self.register_buffer("embedding_sum", torch.zeros(size, dim, device=device, dtype=dtype))
        self._cache_key: tuple | None = None
        self._cache: tuple[torch.Tensor, torch.Tensor] | None = None

    def _tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(vectors (size, dim), [vectors, 1, |vectors|^2] (size, dim + 2)), cached while the buffers are unchanged."""
        s, u = self.embedding_sum, self.cluster_usage
        key = (s.data_ptr(), _version(s), u.data_ptr(), _version(u), s.device, s.dtype)
        if self._cache is not None and key == self._cache_key and None not in key:
            return self._cache
        with torch.no_grad():
            emb = s / u.clamp(min=self.eps)[:, None]
            norm = emb.pow(2).sum(-1, keepdim=True)
            padded = torch.cat([emb, torch.ones_like(norm), norm], dim=-1)
        self._cache, self._cache_key = (emb, padded), key
        return emb, padded

    def embedding(self) -> torch.Tensor:
        """(size, dim) codebook vectors."""
        return self._tables()[0]

    def encode(self, rows: torch.Tensor) -> torch.Tensor:
        """rows (N, dim) -> codes (N,) int64, index of the nearest vector (euclidean).

        Same computation as `torch.cdist` (the reference), which for large codebooks expands
        |x - e|^2 = -2 x.e + |x|^2 + |e|^2 into one matrix product; the |e|^2 part is cached here.
        """
        norm = rows.pow(2).sum(-1, keepdim=True)
        padded = torch.cat([rows * -2, norm, torch.ones_like(norm)], dim=-1)  # (N, dim + 2)
        dist = small_matmul(self._tables()[1], padded).clamp_min(0).sqrt()  # (size, N)
        return dist.argmin(dim=0)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (...) -> vectors (..., dim)."""
        return F.embedding(codes, self._tables()[0])


class ResidualVQ(nn.Module):
    def __init__(
        self, input_dim: int, dim: int, size: int, num_codebooks: int, eps: float = 1e-5, device=None, dtype=None
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.input_proj = nn.Linear(input_dim, dim, bias=False, **factory)
        self.output_proj = nn.Linear(dim, input_dim, bias=False, **factory)
        self.codebooks = nn.ModuleList(Codebook(dim, size, eps, **factory) for _ in range(num_codebooks))

    def encode(self, rows: torch.Tensor, n: int) -> torch.Tensor:
        """rows (N, input_dim) -> codes (n, N) from the first n codebooks."""
        residual = linear_rows(rows, self.input_proj.weight).contiguous()
        codes = []
        for codebook in self.codebooks[:n]:
            c = codebook.encode(residual)
            residual = residual - codebook.decode(c)
            codes.append(c)
        return torch.stack(codes)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (n, N) -> rows (N, input_dim)."""
        quantized = self.codebooks[0].decode(codes[0])
        for codebook, c in zip(self.codebooks[1:], codes[1:]):
            quantized = quantized + codebook.decode(c)
        return linear_rows(quantized, self.output_proj.weight)


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

    def set_num_codebooks(self, n: int) -> None:
        if not self.semantic_codebooks <= n <= self.total_codebooks:
            raise ValueError(f"num_codebooks must be in [{self.semantic_codebooks}, {self.total_codebooks}], got {n}")
        self.num_codebooks = n

    def encode(self, latent: torch.Tensor) -> torch.Tensor:
        """latent (B, input_dim, F) -> codes (B, num_codebooks, F) int64."""
        B, D, T = latent.shape
        rows = latent.transpose(1, 2).reshape(B * T, D)
        codes = self.semantic.encode(rows, self.semantic_codebooks)
        rest = self.num_codebooks - self.semantic_codebooks
        if rest > 0:
            codes = torch.cat([codes, self.acoustic.encode(rows, rest)])
        return codes.view(-1, B, T).transpose(0, 1)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, K, F) with K <= total_codebooks -> latent (B, input_dim, F)."""
        B, K, T = codes.shape
        flat = codes.transpose(0, 1).reshape(K, B * T)
        rows = self.semantic.decode(flat[: self.semantic_codebooks])
        if K > self.semantic_codebooks:
            rows = rows + self.acoustic.decode(flat[self.semantic_codebooks :])
        return rows.reshape(B, T, -1).transpose(1, 2)
