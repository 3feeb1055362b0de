"""The example kernel's claim: it proves the ledger end to end (a memory-bound kernel near the copy peak)."""
from impl.common.ledger import Claim, ExtraInfo

CLAIMS = [
    Claim(id="examples.axpy_bandwidth", system="examples",
          statement="Triton axpy on 64M float32 moves bytes at >= 80% of the card's measured copy bandwidth",
          unit="% of copy peak", comparison=">=", target=80.0,
          measure=ExtraInfo("test_examples_axpy[67108864]", "pct_peak_bw")),
]
