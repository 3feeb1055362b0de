"""seam: the stitched family's structure, shapes, identity stitches, least-squares init, BN statistics, FLOPs, data.

Real timm ResNet34/ResNet50 at small inputs (8-32 px, batch 1-3) on the CPU; the same tests run on a GPU with more
examples. Activations for the least-squares check come from forward hooks on timm's own forward, not from the code
under test.
"""
from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fixtures.oracle import assert_close
from fixtures.seam import make_family, randomize_bn, synthetic_bundle
from impl import backend
from impl.seam.data import preprocess, read_idx_images, read_idx_labels, shift_flip, write_idx
from impl.seam.family import Config, SeamFamily, stitch_points
from impl.seam.lstsq import init_stitches, pixels, solve_lstsq
from impl.seam.measure import calibrate_bn, count_flops
from impl.seam.models import AnchorConfig, build_anchor

pytestmark = pytest.mark.one_cpu_thread  # fixtures/seam.py
DEV = "cuda" if backend.ON_GPU else "cpu"


FEW = settings(max_examples=40 if backend.ON_GPU else 6)
SOME = settings(max_examples=60 if backend.ON_GPU else 12)


@pytest.fixture(scope="module")
def family() -> SeamFamily:
    return make_family().to(DEV)


@contextlib.contextmanager
def exact_fp32():
    """Disable TF32 (GPU convs/matmuls would round to 10-bit mantissas); restore the settings after."""
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


def hooked_block_outputs(net: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Output of every residual block, captured by hooks while timm's own ``net(x)`` runs."""
    mods = [b for layer in (net.layer1, net.layer2, net.layer3, net.layer4) for b in layer]
    outs: list[torch.Tensor] = []
    handles = [m.register_forward_hook(lambda _m, _i, o: outs.append(o.detach().float())) for m in mods]
    try:
        with torch.no_grad():
            net(x)
    finally:
        for h in handles:
            h.remove()
    assert len(outs) == len(mods)
    return outs


# ---- structure ------------------------------------------------------------------------------------------------------

def test_family_has_every_stitch_point_in_both_directions(family):
    assert family.layout == (3, 4, 6, 3)
    assert family.points == list(range(1, 16))
    names = [c.name for c in family.configs]
    assert len(names) == len(set(names)) == 2 + 2 * 15
    assert {c.name for c in family.configs if c.is_anchor} == {"r34", "r50"}
    widths = {1: (64, 256), 2: (128, 512), 3: (256, 1024), 4: (512, 2048)}
    for cfg in family.stitch_configs:
        conv = family.stitches[cfg.name].conv
        c34, c50 = widths[family.stage_of(cfg)]
        expected = (c34, c50) if cfg.front == "r34" else (c50, c34)
        assert (conv.in_channels, conv.out_channels) == expected, cfg.name
    assert stitch_points((3, 4, 6, 3), "stage") == [3, 7, 13]
    with pytest.raises(ValueError, match="granularity"):
        stitch_points((3, 4, 6, 3), "layer")
    with pytest.raises(KeyError, match="unknown configuration"):
        family.config("r34_to_r50_p16")


def test_stage_granularity_family():
    fam = make_family(width_div=8, granularity="stage")
    assert [c.name for c in fam.stitch_configs] == [f"{a}_to_{b}_p{p:02d}" for a, b in (("r34", "r50"), ("r50", "r34"))
                                                    for p in (3, 7, 13)]


def test_fast_to_slow_family_and_explicit_stitch_subsets():
    fam = make_family(width_div=16, directions="fast_to_slow")
    assert [c.name for c in fam.stitch_configs] == [f"r34_to_r50_p{p:02d}" for p in range(1, 16)]
    sub = make_family(width_div=16, stitches=["r50_to_r34_p02", "r34_to_r50_p09"])
    assert [c.name for c in sub.configs] == ["r34", "r50", "r34_to_r50_p09", "r50_to_r34_p02"]
    assert set(sub.stitches) == {"r34_to_r50_p09", "r50_to_r34_p02"}
    with pytest.raises(ValueError, match="not candidate stitches"):
        make_family(width_div=16, directions="fast_to_slow", stitches=["r50_to_r34_p02"])
    with pytest.raises(ValueError, match="directions"):
        make_family(width_div=16, directions="slow_to_fast")


def test_plan_keeps_exactly_the_stitches_inside_the_anchors_flops_range():
    """The meta-device plan against FLOPs counted on real tensors: same numbers, and kept iff inside the range."""
    from impl.seam.measure import plan_stitches

    anchors = [AnchorConfig(arch=a, width_div=4) for a in ("resnet34", "resnet50")]
    plan = plan_stitches(anchors, (1, 12, 12), directions="both")
    fam = make_family(width_div=4)
    real = {c.name: count_flops(fam, c, (1, 12, 12), "cpu") for c in fam.configs}
    assert plan.flops == real
    inside = [n for n in real if n not in ("r34", "r50") and real["r34"] <= real[n] <= real["r50"]]
    assert plan.keep == inside and 0 < len(inside) < 30  # some candidates fall outside at this geometry
    assert plan_stitches(anchors, (1, 12, 12), directions="both", inside_only=False).keep == \
        [c.name for c in fam.stitch_configs]
    with pytest.raises(ValueError, match="cheaper first"):
        plan_stitches(anchors[::-1], (1, 12, 12))


def test_anchors_are_torchvisions_resnets():
    """timm's networks as built here start like torchvision's (no zeroed residual branch), load torchvision's state
    dicts unchanged and compute the same logits."""
    torchvision = pytest.importorskip("torchvision", reason="torchvision is the reference architecture")
    for arch in ("resnet34", "resnet50"):
        ours = build_anchor(AnchorConfig(arch=arch, in_chans=3, small_stem=False)).eval()
        assert all(bool((m.weight != 0).all()) for m in ours.modules() if isinstance(m, torch.nn.BatchNorm2d))
        ref = getattr(torchvision.models, arch)(num_classes=10).eval()
        assert set(ours.state_dict()) == set(ref.state_dict())
        ours.load_state_dict(ref.state_dict())
        x = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)


def test_family_rejects_mismatched_layouts():
    import timm

    nets = {"r18": timm.create_model("resnet18", num_classes=10), "r34": timm.create_model("resnet34", num_classes=10)}
    with pytest.raises(ValueError, match="stage layout"):
        SeamFamily(nets)


@FEW
@given(idx=st.integers(0, 31), size=st.sampled_from([8, 13, 16, 17, 28, 32]), batch=st.integers(1, 3))
def test_every_configuration_builds_and_shapes_flow(family, idx, size, batch):
    cfg = family.configs[idx]
    x = torch.randn(batch, 1, size, size, device=DEV)
    with torch.no_grad():
        out = family(x, cfg)
    assert out.shape == (batch, 10)
    assert torch.isfinite(out).all()


def test_all_configurations_forward_at_28px(family):
    x = torch.randn(2, 1, 28, 28, device=DEV)
    with torch.no_grad():
        outs = {c.name: family(x, c) for c in family.configs}
    assert all(o.shape == (2, 10) and torch.isfinite(o).all() for o in outs.values())
    assert not torch.equal(outs["r34"], outs["r34_to_r50_p07"])  # a stitch really changes the network


def test_forward_does_not_modify_input(family):
    x = torch.randn(2, 1, 16, 16, device=DEV)
    x0 = x.clone()
    with torch.no_grad():
        family(x, "r50_to_r34_p05")
    assert torch.equal(x, x0)


# ---- identity stitches ---------------------------------------------------------------------------------------------

@FEW
@given(arch=st.sampled_from(["resnet34", "resnet50"]), point=st.integers(1, 15),
       size=st.sampled_from([8, 11, 16, 28]), seed=st.integers(0, 2**31 - 1))
def test_self_stitch_with_identity_init_reproduces_the_network_exactly(arch, point, size, seed):
    torch.manual_seed(seed % 1000)
    net = build_anchor(AnchorConfig(arch=arch, width_div=2, zero_init_last=False))
    randomize_bn(net, seed)
    net = net.to(DEV).eval()
    fam = SeamFamily({"a": net, "b": net}).to(DEV).eval()
    cfg = Config("a", "b", point)
    fam.stitches[cfg.name].set_identity()
    x = torch.randn(2, 1, size, size, device=DEV)
    with torch.no_grad(), exact_fp32():
        want = net(x)
        got = fam(x, cfg)
    assert torch.equal(got, want), f"max |diff| {float((got - want).abs().max())}"


def test_identity_stitch_needs_square_channels(family):
    with pytest.raises(ValueError, match="C_in == C_out"):
        family.stitches["r34_to_r50_p01"].set_identity()


# ---- least squares ---------------------------------------------------------------------------------------------------

@st.composite
def lstsq_problems(draw):
    m = draw(st.integers(1, 60))
    k = draw(st.integers(1, 40))
    n = draw(st.integers(1, 5))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    x = rng.standard_normal((m, k)) * draw(st.sampled_from([1e-3, 1.0, 1e3]))
    if draw(st.booleans()) and k > 1:  # rank deficiency: a duplicated and a zero column
        x[:, -1] = x[:, 0]
        x[:, k // 2] = 0.0
    if draw(st.booleans()):  # post-ReLU-like
        x = np.maximum(x, 0)
    y = rng.standard_normal((m, n))
    return x, y


@SOME
@given(problem=lstsq_problems(), method=st.sampled_from(["gelsd", "svd"]))
def test_solve_lstsq_equals_numpy(problem, method):
    x, y = problem
    w, b = solve_lstsq(torch.from_numpy(x), torch.from_numpy(y), method)
    a = np.concatenate([x, np.ones((x.shape[0], 1))], axis=1)
    ref = np.linalg.lstsq(a, y, rcond=None)[0]
    got = np.concatenate([w.numpy(), b.numpy()[None]], axis=0)
    scale = max(1.0, float(np.abs(ref).max()))
    assert_close(got, ref, rtol=1e-7, atol=1e-9 * scale)


@pytest.mark.gpu
def test_solve_lstsq_on_gpu_equals_numpy():
    rng = np.random.default_rng(0)
    for m, k in ((5000, 257), (300, 1025)):
        x, y = np.maximum(rng.standard_normal((m, k - 1)), 0), rng.standard_normal((m, 64))
        w, b = solve_lstsq(torch.from_numpy(x).cuda(), torch.from_numpy(y).cuda())
        ref = np.linalg.lstsq(np.concatenate([x, np.ones((m, 1))], 1), y, rcond=None)[0]
        got = np.concatenate([w.cpu().numpy(), b.cpu().numpy()[None]], axis=0)
        assert_close(got, ref, rtol=1e-6, atol=1e-9 * max(1.0, float(np.abs(ref).max())))


def test_solve_lstsq_rejects_bad_input():
    with pytest.raises(ValueError, match="share M rows"):
        solve_lstsq(torch.zeros(3, 2), torch.zeros(4, 1))
    with pytest.raises(ValueError, match="at least one row"):
        solve_lstsq(torch.zeros(0, 2), torch.zeros(0, 1))
    with pytest.raises(ValueError, match="NaN or inf"):
        solve_lstsq(torch.tensor([[1.0], [float("nan")]]), torch.zeros(2, 1))
    with pytest.raises(ValueError, match="method"):
        solve_lstsq(torch.zeros(2, 2), torch.zeros(2, 1), "qr")


@FEW
@given(idx=st.integers(0, 29), n=st.integers(1, 3), size=st.sampled_from([8, 12, 16]), seed=st.integers(0, 2**16))
def test_lstsq_init_equals_numpy_on_the_same_activations(family, idx, n, size, seed):
    cfg = family.stitch_configs[idx]
    x = torch.randn(n, 1, size, size, device=DEV, generator=torch.Generator(DEV).manual_seed(seed))
    with exact_fp32():
        init_stitches(family, x, [cfg])
        xa = pixels(hooked_block_outputs(family.nets[cfg.front], x)[cfg.point - 1]).double().cpu().numpy()
        ya = pixels(hooked_block_outputs(family.nets[cfg.back], x)[cfg.point - 1]).double().cpu().numpy()
    ref = np.linalg.lstsq(np.concatenate([xa, np.ones((len(xa), 1))], 1), ya, rcond=None)[0]
    conv = family.stitches[cfg.name].conv
    got_w = conv.weight.detach().reshape(conv.out_channels, conv.in_channels).T.double().cpu().numpy()
    got_b = conv.bias.detach().double().cpu().numpy()
    scale = max(1.0, float(np.abs(ref).max()))
    assert_close(got_w, ref[:-1], rtol=1e-5, atol=1e-5 * scale)
    assert_close(got_b, ref[-1], rtol=1e-5, atol=1e-5 * scale)


def test_lstsq_init_of_a_self_stitch_fits_exactly():
    """Stitching a network to itself: y = x is reachable, so the least-squares stitch reproduces y."""
    torch.manual_seed(0)
    net = build_anchor(AnchorConfig(arch="resnet34", width_div=8, zero_init_last=False))
    randomize_bn(net, 0)
    fam = SeamFamily({"a": net, "b": net}).to(DEV).eval()
    x = torch.randn(4, 1, 16, 16, device=DEV)
    for point in (2, 6, 11):
        cfg = Config("a", "b", point)
        with exact_fp32():
            report = init_stitches(fam, x, [cfg])
            h = hooked_block_outputs(net, x)[point - 1]
            with torch.no_grad():
                fit = fam.stitches[cfg.name](h)
        assert report[cfg.name]["rel_residual"] < 1e-6
        assert_close(fit, h, rtol=1e-4, atol=1e-5)


def test_stitch_bn_option_passes_the_fit_through():
    fam = make_family(width_div=8, stitch_bn=True).to(DEV)
    x = torch.randn(4, 1, 16, 16, device=DEV)
    cfg = fam.config("r50_to_r34_p09")
    init_stitches(fam, x, [cfg])
    s = fam.stitches[cfg.name].eval()
    h = torch.randn(3, s.conv.in_channels, 2, 2, device=DEV)
    with torch.no_grad():
        assert_close(s(h), s.conv(h), rtol=1e-4, atol=1e-4)


# ---- BatchNorm statistics per configuration ------------------------------------------------------------------------

def test_calibrate_bn_stores_batch_statistics_and_activate_restores_them():
    fam = make_family(width_div=8).to(DEV)
    data = synthetic_bundle(64, 8, 8, size=12, device=DEV)
    calibrate_bn(fam, "r34", data.train, data, DEV, calib_images=48, batch_size=48, channels_last=False)
    x = preprocess(data.train.images[:48], data.mean, data.std)
    with torch.no_grad():
        h = fam.nets["r34"].conv1(x).double()
    bn = fam.nets["r34"].bn1
    # cuDNN convolutions run in TF32 on a GPU (10-bit mantissa) and may pick another algorithm per batch size
    tol = dict(rtol=5e-3, atol=1e-4) if str(DEV).startswith("cuda") else dict(rtol=1e-4, atol=1e-5)
    assert_close(bn.running_mean, h.mean((0, 2, 3)).float(), **tol)
    assert_close(bn.running_var, h.var((0, 2, 3), unbiased=True).float(), **tol)
    r34_stats = bn.running_mean.clone()
    calibrate_bn(fam, "r34_to_r50_p02", data.train, data, DEV, calib_images=16, batch_size=16, channels_last=False)
    assert not torch.equal(bn.running_mean, r34_stats)  # shared stem BN now holds the stitch's statistics
    fam.activate("r34")
    assert torch.equal(bn.running_mean, r34_stats)
    assert set(fam.bn_states) == {"r34", "r34_to_r50_p02"}
    assert all(k.startswith("nets.r50.") or k.startswith("nets.r34.") for k in fam.bn_states["r34_to_r50_p02"])


# ---- FLOPs and parameters --------------------------------------------------------------------------------------------

def conv_linear_flops_by_hooks(model_fn, modules: list[torch.nn.Module]) -> int:
    """2·MACs of every Conv2d/Linear call, from hooks: an independent count of what flop_counter should report."""
    total = [0]

    def hook(m, inp, out):
        if isinstance(m, torch.nn.Conv2d):
            total[0] += 2 * out.numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
        elif isinstance(m, torch.nn.Linear):
            total[0] += 2 * out.numel() * m.in_features

    hs = [m.register_forward_hook(hook) for top in modules for m in top.modules()
          if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    try:
        with torch.no_grad():
            model_fn()
    finally:
        for h in hs:
            h.remove()
    return total[0]


@FEW
@given(idx=st.integers(0, 31), size=st.sampled_from([8, 16, 28]))
def test_flops_and_params_match_independent_counts(family, idx, size):
    cfg = family.configs[idx]
    x = torch.zeros(1, 1, size, size, device=DEV)
    want = conv_linear_flops_by_hooks(lambda: family(x, cfg), family.path_modules(cfg))
    assert count_flops(family, cfg, (1, size, size), DEV) == want
    if cfg.is_anchor:
        assert family.num_params(cfg) == sum(p.numel() for p in family.nets[cfg.front].parameters())
    else:
        s = family.stitches[cfg.name].conv
        front = family.nets[cfg.front]
        back = family.nets[cfg.back]
        n = sum(p.numel() for m in (front.conv1, front.bn1) for p in m.parameters())
        n += sum(p.numel() for b in family._blocks[cfg.front][: cfg.point] for p in b.parameters())
        n += s.weight.numel() + s.bias.numel()
        n += sum(p.numel() for b in family._blocks[cfg.back][cfg.point:] for p in b.parameters())
        n += sum(p.numel() for p in back.fc.parameters())
        assert family.num_params(cfg) == n


def test_anchor_flops_at_fashion_mnist_size(family):
    """The small-image stems: ResNet34 ≈ 1.87 and ResNet50 ≈ 2.09 GFLOPs at 1x28x28 (2 per MAC)."""
    f34 = count_flops(family, "r34", (1, 28, 28), DEV)
    f50 = count_flops(family, "r50", (1, 28, 28), DEV)
    assert 1.8e9 < f34 < 1.95e9 and 2.0e9 < f50 < 2.2e9


# ---- data ---------------------------------------------------------------------------------------------------------

def test_idx_roundtrip_and_errors(tmp_path):
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (7, 5, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, 7).astype(np.uint8)
    write_idx(imgs, labels, tmp_path / "i.gz", tmp_path / "l.gz")
    assert np.array_equal(read_idx_images(tmp_path / "i.gz"), imgs)
    assert np.array_equal(read_idx_labels(tmp_path / "l.gz"), labels)
    import gzip

    with gzip.open(tmp_path / "bad.gz", "wb") as f:
        f.write(np.array([2049, 7, 5, 3], dtype=">i4").tobytes() + imgs.tobytes())
    with pytest.raises(ValueError, match="magic 2049, expected 2051"):
        read_idx_images(tmp_path / "bad.gz")
    with pytest.raises(ValueError, match="too short"):
        read_idx_images(tmp_path / "l.gz")

    with gzip.open(tmp_path / "short.gz", "wb") as f:
        f.write(np.array([2051, 7, 5, 3], dtype=">i4").tobytes() + imgs.tobytes()[:-1])
    with pytest.raises(ValueError, match="holds"):
        read_idx_images(tmp_path / "short.gz")
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        read_idx_images(tmp_path / "missing.gz")


@SOME
@given(n=st.integers(1, 5), size=st.integers(1, 9), pad=st.integers(0, 3), seed=st.integers(0, 2**16))
def test_shift_flip_matches_numpy_crop_and_mirror(n, size, pad, seed):
    rng = np.random.default_rng(seed)
    imgs = rng.integers(0, 256, (n, 2, size, size + 1), dtype=np.uint8)
    dy, dx = rng.integers(0, 2 * pad + 1, n), rng.integers(0, 2 * pad + 1, n)
    flip = rng.random(n) < 0.5
    got = shift_flip(torch.from_numpy(imgs), torch.from_numpy(dy), torch.from_numpy(dx), torch.from_numpy(flip), pad)
    padded = np.pad(imgs, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    want = np.stack([padded[i, :, dy[i]: dy[i] + size, dx[i]: dx[i] + size + 1] for i in range(n)])
    want[flip] = want[flip][..., ::-1]
    assert_close(got.numpy(), want)


def test_preprocess_normalises_in_float64_terms_and_replicates_gray():
    x = torch.tensor([[[[0, 255], [128, 7]]]], dtype=torch.uint8)
    got = preprocess(x, (0.5, 0.4, 0.3), (0.2, 0.25, 0.5), channels=3)
    ref = (x.double().numpy() / 255.0 - np.array([0.5, 0.4, 0.3])[None, :, None, None]) / \
        np.array([0.2, 0.25, 0.5])[None, :, None, None]
    assert_close(got.numpy(), ref.astype(np.float32), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        preprocess(x[0], (0.5,), (0.2,))
    with pytest.raises(ValueError, match="cannot turn"):
        preprocess(torch.zeros(1, 2, 2, 2, dtype=torch.uint8), (0.5,), (0.2,), channels=3)


def test_fashion_mnist_files_parse():
    from impl.seam.data import IDX_FILES, default_data_dir

    d = default_data_dir()
    if not (d / IDX_FILES["train"][0]).exists():
        pytest.skip(f"Fashion-MNIST not found in {d} (Debian package dataset-fashion-mnist, or set SEAM_DATA)")
    x, y = read_idx_images(d / IDX_FILES["train"][0]), read_idx_labels(d / IDX_FILES["train"][1])
    assert x.shape == (60000, 28, 28) and y.shape == (60000,) and set(np.unique(y)) == set(range(10))
    assert read_idx_images(d / IDX_FILES["test"][0]).shape == (10000, 28, 28)


def test_load_data_splits_are_disjoint_and_seeded(tmp_path):
    from impl.seam.data import IDX_FILES, load_data

    rng = np.random.default_rng(1)
    n = 50
    imgs = np.zeros((n, 4, 4), dtype=np.uint8)
    imgs[:, 0, 0] = np.arange(n)  # pixel (0, 0) identifies the image
    labels = rng.integers(0, 10, n).astype(np.uint8)
    labels[:10] = np.arange(10)
    write_idx(imgs, labels, tmp_path / IDX_FILES["train"][0], tmp_path / IDX_FILES["train"][1])
    write_idx(imgs[:9], labels[:9], tmp_path / IDX_FILES["test"][0], tmp_path / IDX_FILES["test"][1])
    a = load_data(tmp_path, "cpu", val_size=12, seed=3)
    b = load_data(tmp_path, "cpu", val_size=12, seed=3)
    ids_train = set(a.train.images[:, 0, 0, 0].tolist())
    ids_val = set(a.val.images[:, 0, 0, 0].tolist())
    assert len(ids_train) == 38 and len(ids_val) == 12 and not ids_train & ids_val
    assert torch.equal(a.val.images, b.val.images) and a.num_classes == 10 and a.image_size == 4
    assert torch.equal(a.train.labels, torch.from_numpy(labels[a.train.images[:, 0, 0, 0].numpy()].astype(np.int64)))
    with pytest.raises(ValueError, match="leaves no training"):
        load_data(tmp_path, "cpu", val_size=50)
    with pytest.raises(FileNotFoundError, match="neither"):
        load_data(tmp_path / "nowhere", "cpu")


def test_records_name_a_data_folder_inside_the_repository_relative_to_it(tmp_path, monkeypatch):
    """No machine's checkout path in a record: a folder inside the repository is named relative to it (and loads
    from that name whatever the working directory), one outside as given."""
    from impl.seam import data as seam_data
    from impl.seam.data import IDX_FILES, load_data, source_of

    inside = tmp_path / "repo" / ".carry" / "seam" / "fm"
    inside.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", 30), ("test", 10)):
        images, labels = IDX_FILES[split]
        write_idx(rng.integers(0, 256, (n, 4, 4), dtype=np.uint8), rng.integers(0, 10, n).astype(np.uint8),
                  inside / images, inside / labels)
    monkeypatch.setattr(seam_data, "ROOT", (tmp_path / "repo").resolve())
    monkeypatch.chdir(tmp_path)
    assert source_of(inside) == ".carry/seam/fm" and source_of(tmp_path) == str(tmp_path)
    got = load_data(".carry/seam/fm", "cpu", val_size=5)
    assert got.source == ".carry/seam/fm" and len(got.test) == 10


def test_load_data_reads_an_image_folder(tmp_path):
    from PIL import Image

    from impl.seam.data import load_data

    rng = np.random.default_rng(0)
    for split, count in (("train", 6), ("val", 2)):
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(count):
                pixels_ = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
                Image.fromarray(pixels_).save(tmp_path / split / cls / f"{i}.png")
    data = load_data(tmp_path, "cpu", val_size=4, image_size=16)
    assert data.kind == "folder" and data.num_classes == 2 and data.channels == 3
    assert data.gpu_augment  # small images: the shift + flip recipe of Fashion-MNIST, unchanged
    assert not load_data(tmp_path, "cpu", val_size=4, image_size=96).gpu_augment  # RandomResizedCrop instead
    assert (len(data.train), len(data.val), len(data.test)) == (8, 4, 4)
    for split in (data.train, data.val, data.test):
        x, y = next(split.batches(3))
        assert x.dtype == torch.uint8 and x.shape == (3, 3, 16, 16) and y.dtype == torch.int64


def test_prepare_carry_copies_the_four_files_and_data_dir_honours_seam_data(tmp_path, monkeypatch):
    from impl.seam.data import IDX_FILES, default_data_dir, prepare_carry

    src = tmp_path / "src"
    src.mkdir()
    for split, n in (("train", 6), ("test", 3)):
        write_idx(np.zeros((n, 2, 2), np.uint8), np.arange(n, dtype=np.uint8), src / IDX_FILES[split][0],
                  src / IDX_FILES[split][1])
    dest = prepare_carry(src, tmp_path / "carry")
    assert sorted(p.name for p in dest.iterdir()) == sorted(n for pair in IDX_FILES.values() for n in pair)
    assert np.array_equal(read_idx_labels(dest / IDX_FILES["train"][1]), np.arange(6))
    monkeypatch.setenv("SEAM_DATA", str(dest))
    assert default_data_dir() == dest
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        prepare_carry(tmp_path / "empty", tmp_path / "carry2")
