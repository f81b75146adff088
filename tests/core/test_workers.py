"""The one worker-pool policy (pilelm.core.workers): count, start method, warm-up, parent death."""

from __future__ import annotations

import os
import threading

from pilelm.core.workers import process_pool, start_context, worker_count


def test_worker_count_is_the_request_or_the_usable_cores():
    assert worker_count(3) == 3
    assert worker_count(0) == len(os.sched_getaffinity(0)) >= 1


def test_fork_only_when_asked_for_and_no_other_thread_runs():
    assert start_context(inherit=True).get_start_method() == "fork"
    assert start_context(inherit=False).get_start_method() == "forkserver"
    stop = threading.Event()
    busy = threading.Thread(target=stop.wait)  # a non-daemon thread: forking beside it is unsafe
    busy.start()
    try:
        assert start_context(inherit=True).get_start_method() == "forkserver"
    finally:
        stop.set()
        busy.join()


_INHERITED = None


def _inherited() -> object:
    return _INHERITED


def test_warm_pool_of_forks_sees_the_parents_state():
    global _INHERITED
    _INHERITED = "loaded"
    try:
        pool = process_pool(2, inherit=True, warm_up=True)
    finally:
        _INHERITED = None
    try:
        # The state was gone before the first task: only workers forked during warm-up have it.
        assert [pool.submit(_inherited).result() for _ in range(4)] == ["loaded"] * 4
    finally:
        pool.shutdown()
