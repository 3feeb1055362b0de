"""Pytest fixtures for l2cache's tests and benches: the shared controller and the autouse state guard.

Import both into a test or bench module (``from impl.l2cache.testing import l2_controller, l2_guard``): the guard is
autouse there. It snapshots the carve-out and the windows of the lab's streams before each test and fails the test
if they differ afterwards (restoring them first, so one leak does not cascade). On a GPU it reads the device through
the real driver; without one it reads the shared ``FAKE`` driver, which every CPU test that touches "the device" uses.
"""
from __future__ import annotations

import pytest

from impl.l2cache.control import L2Controller, diff_states
from impl.l2cache.fake import FakeL2Driver
from impl.l2cache.serving import lab_streams, stream_handles, use_graphs

FAKE = FakeL2Driver()
_CONTROLLER: L2Controller | None = None


def shared_controller() -> L2Controller:
    """The real device's controller on a GPU, else one over the shared fake driver."""
    global _CONTROLLER
    if _CONTROLLER is None:
        if use_graphs():
            from impl.l2cache.control import CudaRuntimeDriver

            _CONTROLLER = L2Controller(CudaRuntimeDriver())
        else:
            _CONTROLLER = L2Controller(FAKE)
    return _CONTROLLER


def check_restored(controller: L2Controller, before, streams) -> list[str]:
    """Differences between ``before`` and the state now; restores ``before`` when there are any."""
    problems = diff_states(before, controller.snapshot(streams))
    if problems:
        controller.restore(before)
    return problems


@pytest.fixture
def l2_controller() -> L2Controller:
    return shared_controller()


@pytest.fixture(autouse=True)
def l2_guard():
    controller = shared_controller()
    streams = stream_handles(lab_streams())
    before = controller.snapshot(streams)
    yield
    problems = check_restored(controller, before, streams)
    if problems:
        pytest.fail("the L2 state was not restored after this test: " + "; ".join(problems), pytrace=False)
