"""Device side, before the fp8 quality run: the quality run's CUDA paths on a random Llama-shaped model (bf16, every
group, GPTQ and smoothing, alpha chosen on calibration tokens), the model's weights back afterwards; then GPTQ's
column loop timed per weight and batched on SmolLM2's linear shapes (four blocks). Prints; writes nothing."""
import time

import torch

from impl.common.timing import time_fn
from impl.fp8 import quality
from impl.fp8.gptq import gptq_quantize, gptq_quantize_many
from impl.kvstitch.models import TinySpec, tiny_model

BLOCKS = 4
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def check_quality_paths() -> None:
    spec = TinySpec(arch="llama", layers=2, hidden=256, heads=4, kv_heads=2, head_dim=64, intermediate=512, vocab=512)
    model = tiny_model(spec, seed=1, dtype=torch.bfloat16).to(DEV)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    g = torch.Generator().manual_seed(0)
    calib, ids = torch.randint(0, 512, (512,), generator=g), torch.randint(0, 512, (1024,), generator=g)
    variants = quality.variants_for(["all"], quality.GROUPS, gptq_policies=("all",), smooth_policies=("all",))
    t = time.perf_counter()
    moments = quality.group_moments(model, calib, quality.GROUPS, window=128, bos=None)
    out = quality.evaluate_variants(model, ids, calib, variants, window=128, batch=4, bos=None, moments=moments,
                                    sensitivity_group=None, log=print)
    same = all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    print(f"quality paths: complete={out['complete']} variants={len(out['variants'])} weights restored={same} "
          f"alpha={out['smooth']['alpha']} ({time.perf_counter() - t:.1f} s)")


def time_gptq() -> None:
    torch.manual_seed(0)
    shapes = ([(576, 576)] * 2 + [(192, 576)] * 2 + [(1536, 576)] * 2 + [(576, 1536)]) * BLOCKS
    items = []
    for n, k in shapes:
        x = torch.randn(4096, k, device=DEV)
        items.append((torch.randn(n, k, device=DEV, dtype=torch.bfloat16), (x.T @ x) / 4096, "channel", None))
    for name, fn in (("per weight", lambda: [gptq_quantize(w, h, gr, scales=s) for w, h, gr, s in items]),
                     ("batched", lambda: gptq_quantize_many(items))):
        seconds = time_fn(fn, warmup=1, reps=1, flush=False).median_ms / 1e3
        print(f"gptq {name}: {seconds:.2f} s for {BLOCKS} SmolLM2 blocks ({len(items)} linears)")


if __name__ == "__main__":
    check_quality_paths()
    time_gptq()
