"""cuda_graph.make_programmatic's choice of edges, over a stand-in driver (no GPU): only edges from a
kernel node into one of our kernels become programmatic; edges into library kernels (cuBLAS) or
from and to other nodes (memsets, copies) keep their full dependency. The GPU side (graphs replay
token for token as eager launches with the edges changed) is tests/gpu/test_cuda_graphs.py."""
from __future__ import annotations

import ctypes

from orcd_grpc.backends import cuda_graph

KERNEL, MEMSET = 0, 2


class FakeDriver:
    """A captured chain: norm -> memset -> absmax -> cublas -> add_bias -> rope (node ids 1..6)."""

    def __init__(self):
        self.nodes = {1: (KERNEL, b"rms_norm_block"), 2: (MEMSET, None), 3: (KERNEL, b"absmax_rows"),
                      4: (KERNEL, b"_Z17sm90_xmma_gemm_f16"), 5: (KERNEL, b"add_bias_rows"),
                      6: (KERNEL, b"qkv_rope_store_f32")}
        self.edges = {(a, a + 1): 0 for a in range(1, 6)}  # (src, dst) -> dependency type
        self.funcs = {}

    def cuGraphGetEdges_v2(self, graph, src, dst, data, n):
        count = n._obj
        if src is None:
            count.value = len(self.edges)
            return 0
        for i, ((a, b), kind) in enumerate(sorted(self.edges.items())):
            src[i], dst[i] = a, b
            data[i].type = kind
        return 0

    def cuGraphNodeGetType(self, node, kind):
        kind._obj.value = self.nodes[node.value][0]
        return 0

    def cuGraphKernelNodeGetParams_v2(self, node, params):
        ctypes.c_void_p.from_buffer(params).value = 1000 + node.value  # the CUfunction: 1000 + node id
        return 0

    def cuFuncGetName(self, name, func):
        name._obj.value = self.nodes[func.value - 1000][1]
        return 0

    def cuGraphRemoveDependencies_v2(self, graph, a, b, data, n):
        key = (a._obj.value, b._obj.value)
        assert self.edges[key] == data._obj.type
        del self.edges[key]
        return 0

    def cuGraphAddDependencies_v2(self, graph, a, b, data, n):
        edge = data._obj
        assert edge.from_port == 1 and edge.type == 1  # the programmatic port and type
        self.edges[(a._obj.value, b._obj.value)] = edge.type
        return 0


def test_only_edges_into_our_kernels_from_kernels_change(monkeypatch):
    drv = FakeDriver()
    monkeypatch.setattr(cuda_graph, "_cu", lambda: drv)
    ours = {"rms_norm_block", "absmax_rows", "add_bias_rows", "qkv_rope_store_f32"}
    changed = cuda_graph.make_programmatic(ctypes.c_void_p(7), ours.__contains__)
    assert changed == 2
    assert drv.edges == {(1, 2): 0,  # kernel -> memset
                         (2, 3): 0,  # memset -> kernel
                         (3, 4): 0,  # ours -> cuBLAS: cuBLAS does not wait in pdl_enter
                         (4, 5): 1,  # cuBLAS -> ours: add_bias_rows waits for it to finish
                         (5, 6): 1}


def test_a_driver_without_edge_data_changes_nothing(monkeypatch):
    class Old:
        pass

    monkeypatch.setattr(cuda_graph, "_cu", lambda: Old())
    assert cuda_graph.make_programmatic(ctypes.c_void_p(7), lambda name: True) == 0
