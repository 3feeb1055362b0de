"""Stitch layers: translate a prefill model's KV cache into the cache a different decode model expects.

For decode layer j with paired prefill layers ``S_j`` (1 or 2 layers), per token t and KV in {K, V}:

    x_t = concat_{i in S_j} [ unrotate_P(K_i)[:, t] ]      (all H_p KV heads of each source, D_p each; V not rotated)
    K_j[:, t] = rotate_Q( reshape(W^K_j x_t + b^K_j, [H_q, D_q]) ),   V_j[:, t] = reshape(W^V_j y_t + b^V_j, [H_q, D_q])

``W`` is dense over heads, so any GQA/MQA layout maps to any other (KV heads, not repeated query heads, are mapped:
that is what the cache stores). Keys are mapped without their RoPE and get the decode model's RoPE back (its base and
per-layer type may differ), so the map itself is position-free. A bundle whose layouts and RoPE are equal and whose
maps are the identity is a *passthrough*: it returns the source tensors themselves (bit-exact, used as the oracle
that the hybrid reproduces a model's own greedy output).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn

from impl.common.checks import require_tensor
from impl.kvstitch.config import StitchConfig
from impl.kvstitch.models import KV, kv_layout
from impl.kvstitch.rope import Rope, positions_for, rotate, text_config, unrotate


def pair_layers(n_prefill: int, n_decode: int, parents: list[int] | None = None) -> list[tuple[int, ...]]:
    """Prefill layers feeding each decode layer: ``parents[j]`` when given, else floor/ceil of relative depth."""
    if n_prefill < 1 or n_decode < 1:
        raise ValueError(f"both models need layers, got prefill={n_prefill}, decode={n_decode}")
    if parents is not None:
        if len(parents) != n_decode or not all(0 <= p < n_prefill for p in parents):
            raise ValueError(f"parent layers {parents} do not fit {n_decode} decode / {n_prefill} prefill layers")
        return [(int(p),) for p in parents]
    out = []
    for j in range(n_decode):
        pos = j * (n_prefill - 1) / (n_decode - 1) if n_decode > 1 else (n_prefill - 1) / 2
        out.append(tuple(sorted({math.floor(pos + 1e-9), math.ceil(pos - 1e-9)})))
    return out


class StitchLayer(nn.Module):
    """Maps the KV of ``n_src`` prefill layers (``src_heads`` x ``src_dim`` each) to one decode layer's KV."""

    def __init__(self, n_src: int, src_heads: int, src_dim: int, dst_heads: int, dst_dim: int, bias: bool = True):
        super().__init__()
        self.src_shape, self.dst_shape, self.n_src = (src_heads, src_dim), (dst_heads, dst_dim), n_src
        d_in, d_out = n_src * src_heads * src_dim, dst_heads * dst_dim
        self.k_map = nn.Linear(d_in, d_out, bias=bias)
        self.v_map = nn.Linear(d_in, d_out, bias=bias)

    def features(self, xs: list[torch.Tensor]) -> torch.Tensor:
        """``[B, H, T, D]`` per source -> ``[B, T, n_src * H * D]`` (heads then dims, source-major)."""
        b, _, t, _ = xs[0].shape
        return torch.cat([x.transpose(1, 2).reshape(b, t, -1) for x in xs], dim=-1)

    def unflatten(self, y: torch.Tensor) -> torch.Tensor:
        """``[B, T, H_q * D_q]`` -> ``[B, H_q, T, D_q]``."""
        b, t, _ = y.shape
        return y.view(b, t, *self.dst_shape).transpose(1, 2)

    def forward(self, keys: list[torch.Tensor], values: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Un-rotated source keys and source values (lists over sources) -> un-rotated keys, values of the layer."""
        w = self.k_map.weight
        k = self.unflatten(self.k_map(self.features(keys).to(w.dtype)))
        v = self.unflatten(self.v_map(self.features(values).to(w.dtype)))
        return k, v


class StitchBundle(nn.Module):
    """All stitches of one (prefill, decode) pair plus the two models' RoPE, layouts and the layer pairing."""

    def __init__(self, prefill_config, decode_config, spec: StitchConfig | None = None,
                 pairing: list[tuple[int, ...]] | None = None, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.spec = spec or StitchConfig()
        self.prefill_config, self.decode_config = text_config(prefill_config), text_config(decode_config)
        if self.prefill_config.vocab_size != self.decode_config.vocab_size:
            raise ValueError(f"models must share a tokenizer: vocab {self.prefill_config.vocab_size} vs "
                             f"{self.decode_config.vocab_size}")
        self.src = kv_layout(self.prefill_config, dtype)
        self.dst = kv_layout(self.decode_config, dtype)
        parents = getattr(self.decode_config, "kvstitch_parent_layers", None) if self.spec.pairing == "parent" else None
        if parents is not None and len(parents) != self.dst.num_layers:
            parents = None  # a config copied from elsewhere: fall back to depth pairing
        self.pairing = pairing or pair_layers(self.src.num_layers, self.dst.num_layers, parents)
        self.rope_p, self.rope_q = Rope(self.prefill_config), Rope(self.decode_config)
        self.layers = nn.ModuleList(
            StitchLayer(len(srcs), self.src.kv_heads[srcs[0]], self.src.head_dims[srcs[0]], self.dst.kv_heads[j],
                        self.dst.head_dims[j], bias=self.spec.bias)
            for j, srcs in enumerate(self.pairing))
        self.to(dtype)
        self.passthrough = False

    # ---- which prefill layers are needed, bytes on the wire -------------------------------------------------------

    def source_layers(self) -> list[int]:
        return sorted({i for srcs in self.pairing for i in srcs})

    def ready_after(self) -> list[list[int]]:
        """``ready[i]`` = decode layers whose sources are all produced once prefill layer i is done."""
        ready: list[list[int]] = [[] for _ in range(self.src.num_layers)]
        for j, srcs in enumerate(self.pairing):
            ready[max(srcs)].append(j)
        return ready

    def same_rope(self) -> bool:
        pos = positions_for(1, 0, 64, "cpu")
        a, b = self.rope_p.per_layer(pos, torch.float64), self.rope_q.per_layer(pos, torch.float64)
        return all(torch.equal(a[i][0], b[j][0]) and torch.equal(a[i][1], b[j][1])
                   for j, srcs in enumerate(self.pairing) for i in srcs)

    # ---- initialisation ---------------------------------------------------------------------------------------

    @torch.no_grad()
    def init_identity(self) -> "StitchBundle":
        """Identity maps; requires every decode layer to read exactly one prefill layer of the same layout.
        With equal RoPE the bundle becomes a bit-exact passthrough."""
        for j, (srcs, layer) in enumerate(zip(self.pairing, self.layers)):
            if len(srcs) != 1 or layer.src_shape != layer.dst_shape:
                raise ValueError(f"identity stitch needs one source of equal shape per layer; decode layer {j} reads "
                                 f"{srcs} with {layer.src_shape} -> {layer.dst_shape}")
            for lin in (layer.k_map, layer.v_map):
                lin.weight.copy_(torch.eye(lin.weight.shape[0], dtype=lin.weight.dtype))
                if lin.bias is not None:
                    lin.bias.zero_()
        self.passthrough = self.same_rope()
        return self

    @torch.no_grad()
    def init_lstsq(self, kv_p: KV, kv_q: KV, positions: torch.Tensor, ridge: float | None = None) -> dict:
        """Ridge regression of each map on calibration KV (float64): ``W = (X^T X + r I)^-1 X^T Y`` with a bias column.

        ``kv_p``/``kv_q``: the two models' KV of the same tokens. Returns the relative residual per layer."""
        ridge = self.spec.ridge if ridge is None else ridge
        self.passthrough = False
        up, uq = self._unrotated(kv_p, positions, self.rope_p), self._unrotated(kv_q, positions, self.rope_q)
        resid = {}
        for j, (srcs, layer) in enumerate(zip(self.pairing, self.layers)):
            for name, lin, xs, target in (("k", layer.k_map, [up[i][0] for i in srcs], uq[j][0]),
                                          ("v", layer.v_map, [up[i][1] for i in srcs], uq[j][1])):
                x = layer.features(xs).reshape(-1, lin.in_features).double()
                y = target.transpose(1, 2).reshape(-1, lin.out_features).double()
                w, b, r = _ridge(x, y, ridge, lin.bias is not None)
                lin.weight.copy_(w.to(lin.weight.dtype))
                if lin.bias is not None:
                    lin.bias.copy_(b.to(lin.bias.dtype))
                resid[f"{name}{j}"] = r
        return resid

    # ---- apply ------------------------------------------------------------------------------------------------

    def _unrotated(self, kv: KV, positions: torch.Tensor, rope: Rope) -> KV:
        cdt = _compute_dtype(kv[0][0])
        tabs = rope.per_layer(positions, cdt)
        return [(unrotate(k.to(cdt), *tabs[i]), v) for i, (k, v) in enumerate(kv)]

    def check_input(self, kv: KV) -> None:
        if not isinstance(kv, (list, tuple)) or not all(isinstance(p, (list, tuple)) and len(p) == 2 for p in kv):
            raise TypeError(f"prefill KV must be a list of (K, V) pairs, one per layer, got {type(kv).__name__}")
        for i, (k, v) in enumerate(kv):
            require_tensor(k, f"prefill layer {i} K")
            require_tensor(v, f"prefill layer {i} V")
            if not (k.dtype.is_floating_point and v.dtype.is_floating_point):
                raise TypeError(f"prefill layer {i}: K and V must be floating point, got {k.dtype} / {v.dtype}")
        if len(kv) != self.src.num_layers:
            raise ValueError(f"prefill KV has {len(kv)} layers; the stitches were built for {self.src.num_layers}")
        b, _, t, _ = kv[0][0].shape
        for i, (k, v) in enumerate(kv):
            want = (b, self.src.kv_heads[i], t, self.src.head_dims[i])
            if tuple(k.shape) != want or tuple(v.shape) != want:
                raise ValueError(f"prefill layer {i}: K {tuple(k.shape)} / V {tuple(v.shape)}, expected {want} "
                                 "([batch, kv_heads, tokens, head_dim])")

    def stitch_layer(self, j: int, kv_src: dict[int, tuple[torch.Tensor, torch.Tensor]], tabs_p: list, tabs_q: list,
                     out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode layer ``j``'s (K, V) from its source layers' rotated KV ``{i: (K_i, V_i)}`` and RoPE tables."""
        srcs = self.pairing[j]
        if self.passthrough:
            return kv_src[srcs[0]][0].to(out_dtype), kv_src[srcs[0]][1].to(out_dtype)
        cdt = _compute_dtype(kv_src[srcs[0]][0])
        keys = [unrotate(kv_src[i][0].to(cdt), *tabs_p[i]) for i in srcs]
        k, v = self.layers[j](keys, [kv_src[i][1] for i in srcs])
        return rotate(k.to(cdt), *tabs_q[j]).to(out_dtype), v.to(out_dtype)

    def tables(self, positions: torch.Tensor, dtype: torch.dtype = torch.float32) -> tuple[list, list]:
        return self.rope_p.per_layer(positions, dtype), self.rope_q.per_layer(positions, dtype)

    def forward(self, kv: KV, start: int = 0, out_dtype: torch.dtype | None = None) -> KV:
        """Prefill KV (``[B, H_p, T, D_p]`` per layer, positions ``start..start+T-1``) -> decode KV
        (``[B, H_q, T, D_q]`` per decode layer, dtype ``out_dtype``, default the prefill KV's dtype)."""
        self.check_input(kv)
        b, _, t, _ = kv[0][0].shape
        out_dtype = out_dtype or kv[0][0].dtype
        tabs_p, tabs_q = self.tables(positions_for(b, start, t, kv[0][0].device), _compute_dtype(kv[0][0]))
        src = dict(enumerate(kv))
        return [self.stitch_layer(j, src, tabs_p, tabs_q, out_dtype) for j in range(self.dst.num_layers)]

    # ---- persistence ------------------------------------------------------------------------------------------

    def save(self, out_dir: str | Path) -> Path:
        """``stitch.safetensors`` (weights) + ``stitch.json`` (pairing, both configs, spec) in ``out_dir``."""
        from safetensors.torch import save_file

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}, out / "stitch.safetensors")
        meta = {"pairing": [list(p) for p in self.pairing], "passthrough": self.passthrough,
                "spec": vars(self.spec), "prefill_config": self.prefill_config.to_dict(),
                "decode_config": self.decode_config.to_dict(), "dtype": str(self.layers[0].k_map.weight.dtype)}
        (out / "stitch.json").write_text(json.dumps(meta, indent=1))
        return out

    @classmethod
    def load(cls, out_dir: str | Path, device: str = "cpu") -> "StitchBundle":
        from safetensors.torch import load_file
        from transformers import AutoConfig

        d = Path(out_dir)
        meta = json.loads((d / "stitch.json").read_text())
        cfgs = [AutoConfig.for_model(**dict(meta[k])) for k in ("prefill_config", "decode_config")]
        dtype = getattr(torch, str(meta.get("dtype")).replace("torch.", ""), None)
        if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ValueError(f"{d / 'stitch.json'}: dtype {meta.get('dtype')!r} is not a torch floating dtype")
        b = cls(cfgs[0], cfgs[1], StitchConfig(**meta["spec"]), [tuple(p) for p in meta["pairing"]], dtype)
        b.load_state_dict(load_file(d / "stitch.safetensors"))
        b.passthrough = bool(meta["passthrough"])
        return b.to(device)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """RoPE arithmetic runs in float32 (float64 when the KV is float64), never in bf16/fp16."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _ridge(x: torch.Tensor, y: torch.Tensor, ridge: float, bias: bool) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Least squares ``y ~ x W^T + b`` with ridge ``ridge * mean(diag(X^T X))``; returns W, b, relative residual."""
    if bias:
        x = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype, device=x.device)], dim=1)
    g = x.T @ x
    reg = ridge * g.diagonal().mean().clamp_min(1e-12) * torch.eye(len(g), dtype=g.dtype, device=g.device)
    if bias:
        reg[-1, -1] = 0  # the bias column is not shrunk
    sol = torch.linalg.solve(g + reg, x.T @ y)
    r = float((x @ sol - y).norm() / y.norm().clamp_min(1e-30))
    w = sol[:-1].T if bias else sol.T
    b = sol[-1] if bias else torch.zeros(y.shape[1], dtype=y.dtype, device=y.device)
    return w, b, r


def stitch_reference(bundle: StitchBundle, kv: KV, start: int = 0) -> KV:
    """float64 reference of ``bundle(kv)`` for default RoPE: explicit angles ``pos * theta^(-2i/D)``, explicit
    per-token matrix products. Independent of the models' rotary modules (tests compare the two)."""
    def angles(cfg, layer: int, t: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
        rp = cfg.rope_parameters
        types = getattr(cfg, "layer_types", None)
        if "rope_theta" not in rp:
            rp = rp[types[layer]]
        if rp.get("rope_type", "default") != "default":
            raise NotImplementedError("the reference covers default RoPE only")
        inv = rp["rope_theta"] ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
        ang = torch.arange(start, start + t, dtype=torch.float64)[:, None] * inv[None]
        ang = torch.cat([ang, ang], dim=-1)
        return ang.cos(), ang.sin()

    def rot(x, c, s, sign):
        x1, x2 = x.chunk(2, dim=-1)
        return x * c + torch.cat([-x2, x1], dim=-1) * (sign * s)

    out = []
    for j, srcs in enumerate(bundle.pairing):
        layer = bundle.layers[j]
        ks, vs = [], []
        for i in srcs:
            k, v = kv[i][0].double(), kv[i][1].double()
            c, s = angles(bundle.prefill_config, i, k.shape[2], k.shape[3])
            ks.append(rot(k, c, s, -1.0).permute(0, 2, 1, 3).flatten(2))
            vs.append(v.permute(0, 2, 1, 3).flatten(2))
        xk, xv = torch.cat(ks, -1), torch.cat(vs, -1)
        wk, wv = layer.k_map.weight.double(), layer.v_map.weight.double()
        yk = torch.einsum("bti,oi->bto", xk, wk) + (layer.k_map.bias.double() if layer.k_map.bias is not None else 0)
        yv = torch.einsum("bti,oi->bto", xv, wv) + (layer.v_map.bias.double() if layer.v_map.bias is not None else 0)
        h, d = layer.dst_shape
        yk = yk.view(*yk.shape[:2], h, d).permute(0, 2, 1, 3)
        yv = yv.view(*yv.shape[:2], h, d).permute(0, 2, 1, 3)
        c, s = angles(bundle.decode_config, j, yk.shape[2], d)
        out.append((rot(yk, c, s, 1.0), yv))
    return out
