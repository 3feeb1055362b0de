"""The two-process runtime (gloo on the CPU): KV arrives bit-identical, tokens match the in-process hybrid, and the
stitch runs on the side that moves fewer bytes. One launch serves several requests, for both stitch sides."""
import pytest
import torch

from fixtures.oracle import assert_close

from impl.kvstitch.config import RuntimeConfig
from impl.kvstitch.hybrid import generate_alone, generate_hybrid
from impl.kvstitch.models import TinySpec, load_model, prefill, tiny_model
from impl.kvstitch.runtime import kv_shapes, plan_transfer, serve
from impl.kvstitch.stitch import StitchBundle


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    d = tmp_path_factory.mktemp("rt")
    p = tiny_model(TinySpec(layers=4, kv_heads=2, heads=4), 0)
    q = tiny_model(TinySpec(layers=2, hidden=32, kv_heads=1, heads=2, head_dim=16, arch="gemma3"), 1)
    p.save_pretrained(d / "p")
    q.save_pretrained(d / "q")
    b = StitchBundle(p.config, q.config)
    torch.manual_seed(0)
    for prm in b.parameters():
        prm.data.normal_(0, 0.2)
    b.save(d / "s")
    StitchBundle(p.config, p.config).init_identity().save(d / "id")
    reqs = [torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(1)),
            torch.randint(0, 96, (1, 1), generator=torch.Generator().manual_seed(2)),
            torch.randint(0, 96, (3, 12), generator=torch.Generator().manual_seed(3))]
    return d, reqs


@pytest.mark.parametrize("side", ["prefill", "decode"])
def test_kv_arrives_bit_identical_and_tokens_match(pair, side):
    d, reqs = pair
    cfg = RuntimeConfig(new_tokens=5, attn="eager", stitch_side=side)
    r0, r1 = serve(d / "p", d / "q", d / "s", reqs, cfg, dump=True)
    assert r0["plan"] == side
    for sent, got in zip(r0["dump"], r1["dump"]):
        assert len(sent) == len(got) > 0
        for a, b in zip(sent, got):
            assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    pm, qm = load_model(d / "p", attn="eager"), load_model(d / "q", attn="eager")
    bundle = StitchBundle.load(d / "s")
    for res, ids in zip(r0["requests"], reqs):
        assert res["generated"] == generate_hybrid(pm, qm, bundle, ids, 5).tolist()
        assert res["kv_bytes"] == plan_transfer(bundle, torch.float32, side).bytes(*ids.shape)
    if side == "decode":  # what was sent is the prefill model's own KV of the layers the stitches read, in order
        kv = prefill(pm, reqs[0])[0]
        want = [torch.stack(kv[i]) for i in bundle.source_layers()]  # K and V of a layer travel as one message
        assert len(want) == len(r0["dump"][0])
        for a, b in zip(r0["dump"][0], want):
            assert_close(a, b, rtol=1e-5, atol=1e-6)  # another process: its thread count may differ


def test_same_model_with_identity_stitches_reproduces_its_greedy_output(pair):
    d, reqs = pair
    r0, _ = serve(d / "p", d / "p", d / "id", reqs, RuntimeConfig(new_tokens=6, attn="eager", baseline=True))
    pm = load_model(d / "p", attn="eager")
    for res, alone, ids in zip(r0["requests"], r0["alone"], reqs):
        own = generate_alone(pm, ids, 6).tolist()
        assert res["generated"] == own == alone["generated"]
        assert res["ttft_s"] > 0 and res["decode_tokens_per_s"] > 0


def test_plan_picks_the_side_that_moves_fewer_bytes():
    p = tiny_model(TinySpec(layers=4, kv_heads=2, heads=4), 0)
    small = tiny_model(TinySpec(layers=2, hidden=32, kv_heads=1, heads=2, head_dim=8), 1)
    big = tiny_model(TinySpec(layers=6, hidden=64, kv_heads=4, heads=4, head_dim=16), 1)
    down, up = StitchBundle(p.config, small.config), StitchBundle(p.config, big.config)
    plan = plan_transfer(down, torch.bfloat16)
    assert plan.side == "prefill" and plan.bytes(3, 10) == 2 * 3 * 10 * (2 * 1 * 8) * 2
    assert plan_transfer(up, torch.float32).side == "decode"
    # decode side sends only the prefill layers some decode layer reads
    used = down.source_layers()
    assert plan_transfer(down, torch.float32, "decode").bytes(1, 1) == 2 * len(used) * 2 * 8 * 4
    assert kv_shapes(plan, 2, 5) == [(2, 2, 1, 5, 8)] * down.dst.num_layers  # one [2, B, H, T, D] message per layer
    with pytest.raises(ValueError, match="side"):
        plan_transfer(down, torch.float32, "middle")


def test_runtime_rejects_bad_requests(pair):
    d, _ = pair
    with pytest.raises(ValueError, match="int64"):
        serve(d / "p", d / "q", d / "s", [torch.zeros(2, 3)], RuntimeConfig())
    with pytest.raises(ValueError, match="one GPU per rank"):
        serve(d / "p", d / "q", d / "s", [torch.zeros(1, 3, dtype=torch.long)],
              RuntimeConfig(backend="nccl", prefill_device="cuda:0", decode_device="cuda:0"))
