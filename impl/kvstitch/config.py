"""Configs of kvstitch, one dataclass per topic (stitch, pruning, training stages, runtime, evaluation, recipe), and
the decode-model sizes each series is pruned to."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class StitchConfig:
    """How stitches are shaped and initialised.

    ``pairing``: ``parent`` uses the prefill layer a pruned decode layer came from (``config.kvstitch_parent_layers``)
    when present, else ``depth`` (relative depth: decode layer j reads prefill layers floor/ceil of
    ``j (L_p - 1) / (L_q - 1)``). ``init``: ``lstsq`` (ridge regression on calibration KV), ``identity`` (needs equal
    layouts) or ``random``.
    """

    pairing: str = "parent"
    init: str = "lstsq"
    ridge: float = 1e-3
    bias: bool = True


@dataclass
class PruneConfig:
    """Minitron-style pruning of a parent model: keep ``layers`` blocks (by block importance), a fraction
    ``mlp_keep`` of MLP channels and ``kv_groups`` KV-head groups (with their query heads), by activation importance."""

    layers: int | None = None
    mlp_keep: float = 1.0
    kv_groups: int | None = None
    calib_batches: int = 4


# Per series, the decode models the recipe makes from the prefill model (``PruneConfig`` fields), the largest first:
# SmolLM2-135M (30 blocks, 3 KV heads, MLP 1536) and Gemma-3-270M (18 blocks, 1 KV head, MLP 2048).
DECODE_SIZES: dict[str, tuple[dict, ...]] = {
    "smollm2": ({"layers": 20, "mlp_keep": 0.75, "kv_groups": 2}, {"layers": 14, "mlp_keep": 0.5, "kv_groups": 1}),
    "gemma3": ({"layers": 12, "mlp_keep": 0.75}, {"layers": 8, "mlp_keep": 0.5}),
}


@dataclass
class HealConfig:
    """Distillation that heals a pruned student: KL(teacher || student) at temperature ``temperature``."""

    steps: int = 200
    lr: float = 3e-4
    batch: int = 8
    seq_len: int = 256
    temperature: float = 1.0
    seed: int = 0
    log_every: int = 20


@dataclass
class StageAConfig:
    """Stage (a): regress stitched KV onto the decode model's own KV: normalised MSE + ``cos_weight`` (1 - cosine)."""

    steps: int = 200
    lr: float = 1e-3
    batch: int = 8
    seq_len: int = 256
    cos_weight: float = 0.1
    seed: int = 0
    log_every: int = 20


@dataclass
class StageBConfig:
    """Stage (b): LoRA on the decode model + stitches, LM loss on ``cont_len`` tokens after a ``prompt_len`` prefill."""

    steps: int = 200
    lr: float = 2e-4
    stitch_lr: float = 2e-4
    batch: int = 8
    prompt_len: int = 192
    cont_len: int = 64
    lora_r: int = 16
    lora_alpha: int = 32
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    seed: int = 0
    log_every: int = 20


@dataclass
class EvalConfig:
    """Held-out evaluation: ``news`` continuation (prompt ``news_prompt_len`` tokens, default ``prompt_len``; reference
    the next ``new_tokens``; one window per article, or one every ``news_stride`` tokens) and ``wiki``
    lead-as-summary (body truncated to ``prompt_len`` tokens); greedy decoding of ``new_tokens`` tokens."""

    prompt_len: int = 192
    new_tokens: int = 48
    max_news: int = 50
    max_wiki: int = 40
    batch: int = 16
    news_prompt_len: int | None = None
    news_stride: int = 0


@dataclass
class RuntimeConfig:
    """The disaggregated runtime: ``backend`` gloo|nccl, a device per rank, where the stitch runs (``auto`` picks the
    side that moves fewer bytes), and how many tokens the decode worker generates."""

    backend: str = "gloo"
    prefill_device: str = "cpu"
    decode_device: str = "cpu"
    stitch_side: str = "auto"
    new_tokens: int = 16
    dtype: str = "float32"
    attn: str | None = None
    threads: int = 1
    baseline: bool = False
    timeout_s: float = 300.0


@dataclass
class RecipeConfig:
    """The whole experiment of one series at one scale (``smoke`` on CPU, ``quick`` and ``full`` on a GPU)."""

    series: str = "smollm2"
    decode_sizes: list[dict] = field(default_factory=lambda: [{"layers": 20, "mlp_keep": 0.75, "kv_groups": 2}])
    heal: HealConfig = field(default_factory=HealConfig)
    stitch: StitchConfig = field(default_factory=StitchConfig)
    stage_a: StageAConfig = field(default_factory=StageAConfig)
    stage_b: StageBConfig = field(default_factory=StageBConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    dtype: str = "bfloat16"
