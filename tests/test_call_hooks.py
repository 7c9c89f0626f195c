"""call_hooks: policies run as one begin around a call on the grpc.aio server."""
from __future__ import annotations

import grpc
import pytest

from orcd_grpc.call_hooks import NO_HOOKS, Hooks, OnLoop, _chain


class Refuse(Exception):
    pass


class Recorder(Hooks):
    def __init__(self, log, name):
        self.log, self.name = log, name

    def each(self, response):
        self.log.append((self.name, "each", response))

    def end(self):
        self.log.append((self.name, "end"))


def test_a_refusal_ends_the_hooks_of_the_policies_before_it():
    log = []

    def first(request, context):
        log.append(("first", "begin"))
        return Recorder(log, "first")

    def second(request, context):
        raise Refuse("denied")

    with pytest.raises(Refuse):
        _chain([first, second])(None, None)
    assert log == [("first", "begin"), ("first", "end")]


def test_admitted_hooks_see_each_response_in_order_and_end_in_reverse():
    log = []
    begin = _chain([lambda r, c: Recorder(log, "a"), lambda r, c: NO_HOOKS, lambda r, c: Recorder(log, "b")])
    hooks = begin(None, None)
    hooks.each("x")
    hooks.end()
    assert log == [("a", "each", "x"), ("b", "each", "x"), ("b", "end"), ("a", "end")]
    assert _chain([lambda r, c: NO_HOOKS, lambda r, c: NO_HOOKS])(None, None) is NO_HOOKS


def test_the_aio_server_refuses_an_interceptor_that_is_not_a_policy():
    class Plain(grpc.ServerInterceptor):
        def intercept_service(self, continuation, handler_call_details):
            return continuation(handler_call_details)

    with pytest.raises(TypeError, match="Policy"):
        OnLoop([Plain()])
