"""L2 control: windows, the controller's context manager (restores on exit, on exceptions, on driver failures),
policy plans, the CUDA return-code check, and the real driver on a GPU."""
import signal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fixtures.l2cache import check_restored, l2_state_kept
from impl import backend
from impl.l2cache.arena import Span
from impl.l2cache.control import NO_WINDOW, AccessWindow, CudaRuntimeDriver, L2Controller, L2Error
from impl.l2cache.fake import H100_DEFAULT_CARVEOUT, H100_LIMITS, FakeL2Driver
from impl.l2cache.policies import PREFETCH_POLICIES, POLICIES, DefaultPolicy, PersistWeights, StreamActivations
from impl.l2cache.serving import lab_streams, stream_handles

pytestmark = pytest.mark.l2_state  # every test: the L2 state is checked (and put back) afterwards

MB = 1 << 20
STREAMS = (11, 12)


@pytest.fixture
def sigint(request):
    """SIGINT handled as ``request.param`` says (default: Python's own ``KeyboardInterrupt``) for the test, whatever
    this process inherited (a pytest started in the background, or under nohup, ignores it), then as before."""
    handler = getattr(request, "param", signal.default_int_handler)
    old = signal.signal(signal.SIGINT, handler)
    yield handler
    signal.signal(signal.SIGINT, old)


def fresh() -> tuple[FakeL2Driver, L2Controller]:
    drv = FakeL2Driver(windows={11: AccessWindow(4096, 1000, 0.25, "streaming", "normal")})
    return drv, L2Controller(drv)


def test_window_rejects_bad_settings_with_the_reason():
    with pytest.raises(ValueError, match="hit_ratio"):
        AccessWindow(0, 10, 1.5)
    with pytest.raises(ValueError, match=">= 0"):
        AccessWindow(-1, 10)
    with pytest.raises(ValueError, match="one of"):
        AccessWindow(0, 10, 0.5, "sticky")
    with pytest.raises(ValueError, match="not 'persisting'"):
        AccessWindow(0, 10, 0.5, "persisting", "persisting")
    assert AccessWindow(0, 10, 0.1).hit_ratio == pytest.approx(0.1, rel=1e-7)  # stored as a C float
    assert not NO_WINDOW.active and AccessWindow(0, 1).active


def test_applied_sets_then_restores_everything():
    drv, ctl = fresh()
    before = ctl.snapshot(STREAMS)
    w = AccessWindow(1 << 30, 16 * MB, 1.0, "persisting", "streaming")
    with ctl.applied(STREAMS, carveout=16 * MB, window=w) as snap:
        assert snap == before
        assert drv.carveout == 16 * MB and drv.windows[11] == w and drv.windows[12] == w
    assert ctl.snapshot(STREAMS) == before
    assert drv.carveout == H100_DEFAULT_CARVEOUT and drv.resets == 2  # on the way in and on the way out


def test_applied_restores_when_the_body_raises():
    drv, ctl = fresh()
    before = ctl.snapshot(STREAMS)
    with pytest.raises(KeyError, match="boom"):
        with ctl.applied(STREAMS, carveout=0, window=NO_WINDOW):
            assert drv.carveout == 0
            raise KeyError("boom")
    assert ctl.snapshot(STREAMS) == before


def test_applied_restores_when_the_driver_fails_half_way():
    drv, ctl = fresh()
    before = ctl.snapshot(STREAMS)
    drv.fail_on.add("set_window")  # the carve-out is already set when the window call fails
    with pytest.raises(L2Error, match="injected"):
        with ctl.applied(STREAMS, carveout=20 * MB, window=AccessWindow(0, MB, 1.0, "persisting")):
            pytest.fail("the body must not run when applying failed")
    assert ctl.snapshot(STREAMS) == before


def test_restore_tries_every_call_then_reports_the_failure():
    drv, ctl = fresh()
    with pytest.raises(L2Error, match="restoring the L2 state failed"):
        with ctl.applied(STREAMS, carveout=5 * MB, window=AccessWindow(0, MB, 1.0, "persisting")):
            drv.fail_on.add("set_window")  # the first restore call fails ...
    assert drv.carveout == H100_DEFAULT_CARVEOUT  # ... and the carve-out is still put back
    assert drv.windows[12] == NO_WINDOW


@pytest.mark.parametrize("call", ["set_window", "set_carveout", "reset_persisting"])
def test_ctrl_c_raised_inside_a_restore_call_still_restores_everything(call):
    """Ctrl-C raised from inside a driver call on the way out: the call is retried, the others still run, the device
    ends as it began, and the KeyboardInterrupt reaches the caller afterwards."""
    drv, ctl = fresh()
    before = ctl.snapshot(STREAMS)
    with pytest.raises(KeyboardInterrupt):
        with ctl.applied(STREAMS, carveout=5 * MB, window=AccessWindow(0, MB, 1.0, "persisting")):
            drv.interrupt_on.add(call)
    assert not drv.interrupt_on, "the injected interrupt did not fire"
    assert ctl.snapshot(STREAMS) == before
    assert drv.resets == 2


@pytest.mark.parametrize("call", ["set_window", "set_carveout", "reset_persisting"])
def test_ctrl_c_signal_during_restore_is_held_until_the_device_is_restored(call, sigint):
    """A real SIGINT arriving while ``restore`` runs is held: every window and the carve-out are put back first,
    then the KeyboardInterrupt is raised, and the SIGINT handler is Python's again."""
    drv, ctl = fresh()
    before = ctl.snapshot(STREAMS)
    with pytest.raises(KeyboardInterrupt):
        with ctl.applied(STREAMS, carveout=5 * MB, window=AccessWindow(0, MB, 1.0, "persisting")):
            drv.signal_on.add(call)
    assert not drv.signal_on, "the injected signal was not sent"
    assert ctl.snapshot(STREAMS) == before
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_ctrl_c_during_a_plain_restore_is_held_too(sigint):
    drv, ctl = fresh()
    before = ctl.snapshot(STREAMS)
    ctl.apply(STREAMS, carveout=7 * MB, window=AccessWindow(0, MB, 1.0, "persisting"))
    drv.signal_on.add("set_window")  # the first of three restore calls
    with pytest.raises(KeyboardInterrupt):
        ctl.restore(before)
    assert ctl.snapshot(STREAMS) == before
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


@pytest.mark.parametrize("sigint", [signal.SIG_IGN], indirect=True)
def test_a_ctrl_c_this_process_ignores_stays_ignored_through_a_restore(sigint):
    drv, ctl = fresh()
    before = ctl.snapshot(STREAMS)
    ctl.apply(STREAMS, carveout=7 * MB, window=AccessWindow(0, MB, 1.0, "persisting"))
    drv.signal_on.add("set_window")
    ctl.restore(before)  # the held signal is dropped, as the ignoring process would have dropped it
    assert not drv.signal_on, "the injected signal was not sent"
    assert ctl.snapshot(STREAMS) == before
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN


def test_settings_the_device_refuses_are_refused_before_any_call():
    drv, ctl = fresh()
    with pytest.raises(L2Error, match="persistingL2CacheMaxSize"):
        ctl.apply(STREAMS, carveout=H100_LIMITS.max_persisting_bytes + 1)
    with pytest.raises(L2Error, match="accessPolicyMaxWindowSize"):
        ctl.apply(STREAMS, window=AccessWindow(0, H100_LIMITS.max_window_bytes + 1, 1.0))
    assert not [c for c in drv.log if c.startswith("set_")]


def test_full_reset_clears_carveout_windows_and_lines():
    drv, ctl = fresh()
    ctl.full_reset(STREAMS)
    assert drv.carveout == 0 and drv.windows[11] == NO_WINDOW and drv.windows[12] == NO_WINDOW and drv.resets == 1


_windows = st.builds(AccessWindow, st.integers(0, 2**40), st.integers(0, 128 * MB), st.floats(0, 1),
                     st.sampled_from(["normal", "streaming", "persisting"]), st.sampled_from(["normal", "streaming"]))


@given(steps=st.lists(st.tuples(st.one_of(st.none(), st.integers(0, 40 * MB)), st.one_of(st.none(), _windows),
                                st.booleans()), min_size=1, max_size=4))
def test_nested_applications_always_unwind_to_the_start(steps):
    """Property: any nesting of settings (valid or refused), with bodies that raise or not, ends where it began."""
    drv, ctl = fresh()
    before = ctl.snapshot(STREAMS)

    def nest(i: int) -> None:
        if i == len(steps):
            return
        carve, window, raise_ = steps[i]
        try:
            with ctl.applied(STREAMS, carveout=carve, window=window):
                nest(i + 1)
                if raise_:
                    raise RuntimeError(f"body {i}")
        except (RuntimeError, L2Error):
            pass

    nest(0)
    assert ctl.snapshot(STREAMS) == before


def test_guard_check_finds_a_leak_and_repairs_it():
    drv, ctl = fresh()
    before = ctl.snapshot(STREAMS)
    drv.carveout, drv.windows[12] = 123, AccessWindow(0, 1, 1.0, "persisting")
    problems = check_restored(ctl, before, STREAMS)
    assert len(problems) == 2 and "carve-out" in problems[0]
    assert ctl.snapshot(STREAMS) == before


def test_the_guard_fails_a_test_that_leaks_and_puts_the_state_back():
    streams = stream_handles(lab_streams())
    with pytest.raises(pytest.fail.Exception, match="not restored after this test: carve-out"):
        with l2_state_kept() as ctl:
            before = ctl.snapshot(streams)
            ctl.apply(streams, carveout=ctl.limits.max_persisting_bytes // 2, window=AccessWindow(0, 4096, 1.0,
                                                                                                   "persisting"))
    assert ctl.snapshot(streams) == before
    with pytest.raises(KeyError, match="the body's own"):
        with l2_state_kept():
            ctl.apply(streams, carveout=ctl.limits.max_persisting_bytes // 4)
            raise KeyError("the body's own")
    assert ctl.snapshot(streams) == before


@pytest.mark.skipif(backend.ON_GPU, reason="checks the refusal on a machine without a GPU")
def test_real_driver_refuses_to_start_without_a_gpu():
    with pytest.raises(L2Error, match="needs a CUDA device"):
        CudaRuntimeDriver()


# ---- policy plans -------------------------------------------------------------------------------------------

W16 = Span(1 << 32, 0, 16 * MB)
W64 = Span(1 << 32, 0, 64 * MB)


def test_default_plan_is_no_carveout_no_window():
    p = DefaultPolicy().plan(W16, None, H100_LIMITS)
    assert p.carveout_bytes == 0 and not p.window.active and not p.prefetch


@pytest.mark.parametrize("span", [W16, W64, Span(1 << 32, 256, 200 * MB)], ids=["16MB", "64MB", "200MB"])
def test_persist_plan_sizes_hit_ratio_to_the_carveout(span):
    p = PersistWeights().plan(span, None, H100_LIMITS)
    w = p.window
    assert w.base_ptr == span.ptr and w.hit_prop == "persisting" and w.miss_prop == "streaming"
    assert w.num_bytes == min(span.nbytes, H100_LIMITS.max_window_bytes)
    assert p.carveout_bytes == min(H100_LIMITS.max_persisting_bytes, w.num_bytes)
    assert w.hit_ratio == pytest.approx(min(1.0, p.carveout_bytes / w.num_bytes), rel=1e-6)
    assert ("truncated" in p.note) == (span.nbytes > H100_LIMITS.max_window_bytes)


def test_stream_plan_needs_an_activation_span():
    assert not StreamActivations().plan(W16, None, H100_LIMITS).applicable
    p = StreamActivations().plan(W16, Span(1 << 33, 512, 3 * MB), H100_LIMITS)
    assert p.applicable and p.window.hit_prop == "streaming" and p.window.base_ptr == (1 << 33) + 512
    assert p.carveout_bytes == 0


def test_policy_registry_has_the_seven_policies():
    assert set(POLICIES) == {"default", "persist_weights", "stream_activations", "prefetch_stream", "prefetch_ahead",
                             "prefetch_kernel", "persist_prefetch"}
    assert {n: p.prefetch for n, p in POLICIES.items() if p.prefetch} == {
        "prefetch_stream": "stream", "prefetch_ahead": "ahead", "prefetch_kernel": "kernel", "persist_prefetch": "auto"}
    assert PREFETCH_POLICIES == ("prefetch_stream", "prefetch_ahead", "prefetch_kernel")


# ---- the real device ----------------------------------------------------------------------------------------

@pytest.mark.gpu
def test_real_controller_sets_reads_back_and_restores(l2_controller):
    ctl = l2_controller
    lim = ctl.limits
    assert 0 < lim.max_persisting_bytes <= lim.l2_bytes and lim.max_window_bytes > 0
    streams = stream_handles(lab_streams())
    before = ctl.snapshot(streams)
    import torch

    buf = torch.empty(8 * MB, dtype=torch.uint8, device="cuda")
    w = AccessWindow(buf.data_ptr(), buf.numel(), 0.5, "persisting", "streaming")
    with ctl.applied(streams, carveout=4 * MB, window=w):
        now = ctl.snapshot(streams)
        assert now.carveout_bytes >= 4 * MB * 0.9  # the driver may round to its granularity
        assert all(v == w for v in now.windows.values())
    assert ctl.snapshot(streams) == before


@pytest.mark.gpu
def test_real_controller_restores_when_the_body_raises(l2_controller):
    ctl = l2_controller
    streams = stream_handles(lab_streams())
    before = ctl.snapshot(streams)
    with pytest.raises(ZeroDivisionError):
        with ctl.applied(streams, carveout=0, window=AccessWindow(1 << 20, MB, 1.0, "streaming", "streaming")):
            raise ZeroDivisionError("the body failed")
    assert ctl.snapshot(streams) == before


@pytest.mark.gpu
def test_real_driver_reports_cuda_errors():
    with pytest.raises(L2Error, match="cudaSetDevice failed: cudaErrorInvalidDevice"):
        CudaRuntimeDriver(device=999)
