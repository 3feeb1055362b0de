"""Model shapes that several systems bench or serve at, each written once.

    from impl.common.shapes import LLAMA3_8B
    LLAMA3_8B.linear_shapes()["w13"]      # (28672, 4096): the fused gate/up projection, (out, in) features

A shape is only sizes (no weights): benches build random weights of it, serving presets and checkpoint writers take
its numbers.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DecoderShape:
    """A Llama-style decoder: ``n_layers`` blocks of hidden size ``dim``, ``n_heads`` query heads and ``n_kv_heads``
    KV heads of ``head_dim`` (grouped-query attention when fewer), a SwiGLU MLP of width ``ffn_dim``, a vocabulary of
    ``vocab_size`` tokens and RoPE base ``rope_theta``."""

    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int
    vocab_size: int
    rope_theta: float

    def __post_init__(self) -> None:
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(out, in) features of one block's projections: fused QKV ``wqkv``, output ``wo``, fused gate/up ``w13``,
        down ``w2``."""
        q, kv = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        return {"wqkv": (q + 2 * kv, self.dim), "wo": (self.dim, q), "w13": (2 * self.ffn_dim, self.dim),
                "w2": (self.dim, self.ffn_dim)}

    def kernel_matrices(self) -> list[tuple[int, int]]:
        """(out, in) of the weight matrices kernels are benched and tuned on: the gate (or up) projection alone,
        q/o, fused QKV, down, fused gate/up."""
        lin = self.linear_shapes()
        return [(self.ffn_dim, self.dim), lin["wo"], lin["wqkv"], lin["w2"], lin["w13"]]

    def hf_config(self) -> dict[str, int | float]:
        """The same sizes under Hugging Face's ``LlamaConfig`` names."""
        return {"hidden_size": self.dim, "num_hidden_layers": self.n_layers, "num_attention_heads": self.n_heads,
                "num_key_value_heads": self.n_kv_heads, "head_dim": self.head_dim,
                "intermediate_size": self.ffn_dim, "vocab_size": self.vocab_size, "rope_theta": self.rope_theta}


LLAMA3_8B = DecoderShape(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128, ffn_dim=14336,
                         vocab_size=128256, rope_theta=500000.0)
