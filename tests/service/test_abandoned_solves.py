"""A request whose caller is gone (its future cancelled: a client gone, a gRPC deadline, a
shutdown's grace run out) is not solved: it leaves the queue, and a solve all of whose
callers are gone stops at its next iteration. Before, the batcher solved them all for no
one, and a SIGTERM-ed server whose grace ran out stayed up until its whole queue was solved
(111 s past a 3 s grace for 8 queued calls on a loaded machine).

The batchers here run a real solve function in their own threads: a loop that calls
``between`` at each iteration, as model_core's solvers do."""

from __future__ import annotations

import asyncio
import threading
import time

import torch

from service.batcher import Batcher, BatchOutput

ITERATIONS = 5_000  # 1 ms each: a solve that would take 5 s, if nothing stopped it


class Solver:
    """``solve(x, key, between)``: ``ITERATIONS`` iterations of 1 ms, each after ``between()``;
    it records how many iterations each solve ran and whether it reached its end."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.runs: list[dict] = []

    def __call__(self, x: torch.Tensor, key, between) -> BatchOutput:
        run = {"rows": int(x.shape[0]), "iterations": 0, "finished": False}
        self.runs.append(run)
        self.started.set()
        for _ in range(ITERATIONS):
            between()
            run["iterations"] += 1
            time.sleep(0.001)
        run["finished"] = True
        return BatchOutput({"y": 2 * x})


def row(v: float) -> torch.Tensor:
    return torch.full((1, 1), float(v))


async def until(event: threading.Event) -> None:
    while not event.is_set():
        await asyncio.sleep(0.005)


def test_callers_gone_stop_their_solve_and_leave_the_queue():
    solver = Solver()

    async def main() -> None:
        batcher = Batcher(
            "t", solver, max_batch_size=1, max_delay_s=0.01, max_gap_s=0.001, max_queue=100
        )
        first = batcher.submit(row(1), "k")
        await asyncio.wait_for(until(solver.started), 30)
        queued = [batcher.submit(row(v), "k") for v in (2, 3)]  # behind the first solve
        assert batcher.pending_rows == 2
        for future in (first, *queued):
            future.cancel()  # what cancelling the awaiting task does
        await asyncio.wait_for(batcher.close(), 60)
        assert batcher.pending_rows == 0
        assert batcher.solving == 0

    asyncio.run(main())
    assert len(solver.runs) == 1  # the queued ones were never solved
    assert solver.runs[0]["finished"] is False
    assert solver.runs[0]["iterations"] < ITERATIONS


def test_a_solve_goes_on_while_one_of_its_callers_waits():
    solver = Solver()

    async def main() -> list:
        batcher = Batcher(
            "t", solver, max_batch_size=8, max_delay_s=0.01, max_gap_s=0.001, max_queue=100
        )
        gone, stays = batcher.submit(row(1), "k"), batcher.submit(row(2), "k")  # one batch
        await asyncio.wait_for(until(solver.started), 30)
        gone.cancel()
        answer = await asyncio.wait_for(stays, 60)
        await batcher.close()
        return [answer.rows["y"].tolist(), answer.batch_rows]

    assert asyncio.run(main()) == [[[4.0]], 2]  # its own row, of a batch of 2
    assert [(r["rows"], r["finished"], r["iterations"]) for r in solver.runs] == [
        (2, True, ITERATIONS)
    ]
