"""CudaGraph's capture bracket, with a fake driver library (no GPU): Python's cyclic collector stays
off while launches are recorded, since a collection there can free another engine's page-locked
buffers (cuMemFreeHost), which invalidates the capture; it comes back on afterwards, also when
recording fails, and nested captures on two threads restore it only when the last one ends."""
import gc
import threading

import pytest

from orcd_grpc.backends import cuda_graph


class FakeDriver:
    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        def call(*args):
            self.calls.append(name)
            return 0
        return call


class FakeStream:
    handle = 1234


@pytest.fixture
def driver(monkeypatch):
    fake = FakeDriver()
    monkeypatch.setattr(cuda_graph, "_cu", lambda: fake)
    return fake


def test_no_collection_while_recording(driver):
    assert gc.isenabled()
    seen = []
    cuda_graph.CudaGraph(FakeStream(), lambda: seen.append(gc.isenabled()))
    assert seen == [False]
    assert gc.isenabled()
    assert driver.calls[:2] == ["cuStreamBeginCapture_v2", "cuStreamEndCapture"]


def test_collector_back_on_after_a_failed_recording(driver):
    def boom():
        raise RuntimeError("kernel failed")

    with pytest.raises(RuntimeError):
        cuda_graph.CudaGraph(FakeStream(), boom)
    assert gc.isenabled()
    assert "cuStreamEndCapture" in driver.calls  # the stream left capture mode


def test_overlapping_captures_restore_the_collector_once(driver):
    inside, release, seen = threading.Event(), threading.Event(), []

    def slow():
        inside.set()
        release.wait(5)
        seen.append(gc.isenabled())

    t = threading.Thread(target=lambda: cuda_graph.CudaGraph(FakeStream(), slow))
    t.start()
    assert inside.wait(5)
    cuda_graph.CudaGraph(FakeStream(), lambda: seen.append(gc.isenabled()))
    assert not gc.isenabled()  # the other thread still captures
    release.set()
    t.join(5)
    assert seen == [False, False]
    assert gc.isenabled()


def test_a_collector_that_was_off_stays_off(driver):
    gc.disable()
    try:
        cuda_graph.CudaGraph(FakeStream(), lambda: None)
        assert not gc.isenabled()
    finally:
        gc.enable()
