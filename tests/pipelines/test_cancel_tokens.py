"""pipelines/cancel.py: the Cancellation protocol and its tokens, in this process and across one."""

from __future__ import annotations

import multiprocessing
import time

import pytest

from pipelines.cancel import Cancellation, CancelToken, ProcessCancelToken
from pipelines.errors import Cancelled


def work_until_cancelled(token: Cancellation, started, steps_done) -> None:
    """A child process's 'generation': steps until the token says stop (at most ~60 s)."""
    started.set()
    for _ in range(6000):
        try:
            token.raise_if_cancelled()
        except Cancelled:
            return
        steps_done.value += 1
        time.sleep(0.01)
    raise SystemExit(3)  # never cancelled


@pytest.mark.parametrize("make", [CancelToken, ProcessCancelToken])
def test_a_token_is_a_cancellation_and_raises_once_cancelled(make):
    token = make()
    assert isinstance(token, Cancellation)
    assert not token.cancelled
    token.raise_if_cancelled()  # no-op
    token.cancel()
    assert token.cancelled
    with pytest.raises(Cancelled):
        token.raise_if_cancelled()


def test_request_module_still_exports_the_thread_token():
    from pipelines.request import CancelToken as FromRequest

    assert FromRequest is CancelToken


def test_a_cancel_in_the_parent_stops_work_in_a_spawned_child():
    ctx = multiprocessing.get_context("spawn")
    token = ProcessCancelToken(ctx)
    started, steps_done = ctx.Event(), ctx.Value("i", 0)
    child = ctx.Process(target=work_until_cancelled, args=(token, started, steps_done))
    child.start()
    try:
        assert started.wait(60), "the child did not start"
        while steps_done.value < 3:  # it is working
            time.sleep(0.01)
        token.cancel()
        child.join(30)
        assert child.exitcode == 0  # returned at its next check: not still running, not killed, not run out
    finally:
        if child.is_alive():
            child.kill()
            child.join()
