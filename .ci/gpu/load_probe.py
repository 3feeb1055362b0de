"""Device side: the FP8 loader's speed against its read threads and chunk size, warm (page cache) and cold (evicted),
on the bench's checkpoint (two Llama-3-8B layers, per-channel FP8, a 32k bf16 embedding), beside the plain parallel
read of the same files. Prints a table (medians); writes nothing outside /tmp."""
from pathlib import Path

import torch

from impl.common.shapes import LLAMA3_8B
from impl.common.timing import time_fn
from impl.fp8 import staging
from impl.fp8.loader import load_checkpoint
from impl.fp8.tiny import shape_config, write_random_fp8_checkpoint

DIR = Path("/tmp/load_probe")
DEV = "cuda" if torch.cuda.is_available() else "cpu"
THREADS = (8, 12, 16, 24)
CHUNKS_MB = (16, 32, 64)


def median_gbps(fn, nbytes: int, rounds: int, evict=None) -> float:
    """GB/s at the median of ``rounds`` timed calls after one warm-up (``evict`` before each, outside the time)."""
    return nbytes / time_fn(fn, warmup=1, reps=rounds, flush=False, setup=evict).median_ms / 1e6


def main() -> None:
    DIR.mkdir(exist_ok=True)
    cfg = shape_config(LLAMA3_8B, num_hidden_layers=2, vocab_size=32000, tie_word_embeddings=True)
    nbytes = write_random_fp8_checkpoint(DIR, cfg, "vllm-channel", shard_bytes=1 << 30)
    files = sorted(DIR.glob("*.safetensors"))
    ev = staging.evict(files)
    print(f"checkpoint {nbytes / 1e9:.3f} GB in {len(files)} files; evict: {ev['method']} ok={ev['ok']}")
    evict = (lambda: staging.evict(files)) if ev["ok"] else None
    for t in THREADS:
        warm = median_gbps(lambda: staging.plain_read(files, threads=t), nbytes, 7)
        cold = median_gbps(lambda: staging.plain_read(files, threads=t), nbytes, 3, evict) if evict else float("nan")
        print(f"plain read  threads {t:2d}: warm {warm:6.2f} GB/s  cold {cold:5.2f} GB/s")
    for t in THREADS:
        for c in CHUNKS_MB:
            def load():
                return load_checkpoint(DIR, DEV, threads=t, chunk_bytes=c << 20, progress=False)
            warm = median_gbps(load, nbytes, 7)
            cold = median_gbps(load, nbytes, 3, evict) if evict else float("nan")
            print(f"loader threads {t:2d} chunk {c:2d} MiB: warm {warm:6.2f} GB/s  cold {cold:5.2f} GB/s")


if __name__ == "__main__":
    main()
