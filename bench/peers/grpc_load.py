"""A gRPC load generator for the V2 protocol (``inference.GRPCInferenceService/ModelInfer``),
for ``bench/service_load.py``: ``--connections`` concurrent callers, each one request at a time,
spread over ``--processes`` processes (one grpc channel each), rotating the images in
``--images`` (``tensor-<i>.f32``: raw FP32 ``(1, 1, 28, 28)``, sent as
``raw_input_contents``).

The requests are serialised once and sent as bytes, and answers are not parsed (a call that
ends in any status but OK counts as an error under its code), so that the generator's CPU per
request is grpc's alone; the benchmark measures that CPU and reports it beside the rate.

Runs in the peers' virtual environment (it uses KServe's generated stubs of the Open Inference
Protocol's proto). Prints one JSON line like wrk's (bench/wrk/report.lua)::

    python bench/peers/grpc_load.py --target 127.0.0.1:8081 --model fmnist-fc --images DIR
        [--connections 64] [--processes 2] [--duration 5] [--warmup 1]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import threading
import time
from pathlib import Path

import grpc
from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb

METHOD = "/inference.GRPCInferenceService/ModelInfer"


def requests(model: str, images: Path) -> list[bytes]:
    """One serialised ``ModelInferRequest`` per ``tensor-<i>.f32`` in ``images``."""
    n = int((images / "count.txt").read_text())
    out = []
    for i in range(n):
        req = pb.ModelInferRequest(model_name=model, id=str(i))
        # The input's data travels in raw_input_contents, not in its contents field.
        req.inputs.add(name="input", datatype="FP32", shape=[1, 1, 28, 28])
        req.outputs.add(name="label")
        req.raw_input_contents.append((images / f"tensor-{i}.f32").read_bytes())
        out.append(req.SerializeToString())
    return out


def drive(args, bodies: list[bytes], callers: int, offset: int) -> dict:
    """``callers`` calls kept in flight on one channel, each followed by the next from its
    done-callback; latencies (s) and errors of the timed part (calls that start after the
    warm-up and end before the stop).

    Futures with callbacks, not grpc.aio: the callbacks run on grpc's own completion thread,
    which costs half the CPU per call of an asyncio caller (measured: ~150 against ~300 µs).
    """
    latencies: list[float] = []
    errors: dict[str, int] = {}
    running = [callers]
    lock, finished = threading.Lock(), threading.Event()
    with grpc.insecure_channel(args.target) as channel:
        call = channel.unary_unary(METHOD)  # bytes in, bytes out: no protobuf in the loop
        t_measure = time.perf_counter() + args.warmup
        t_stop = t_measure + args.duration

        def issue(i: int) -> None:
            t0 = time.perf_counter()
            future = call.future(bodies[i % len(bodies)], timeout=120)
            future.add_done_callback(lambda f: done(f, t0, i))

        def done(future: grpc.Future, t0: float, i: int) -> None:
            t1 = time.perf_counter()
            if t0 >= t_measure and t1 <= t_stop:
                code = future.code()
                if code == grpc.StatusCode.OK:
                    latencies.append(t1 - t0)
                else:
                    errors[code.name] = errors.get(code.name, 0) + 1
            if t1 < t_stop:
                issue(i + callers)
                return
            with lock:
                running[0] -= 1
                if running[0] == 0:
                    finished.set()

        for k in range(callers):
            issue(offset + k)
        finished.wait()
    return {"latencies": latencies, "errors": errors}


def worker(args, bodies: list[bytes], callers: int, offset: int, queue) -> None:
    cpu0 = time.process_time()  # this process's threads, grpc's own included
    out = drive(args, bodies, callers, offset)
    queue.put({**out, "cpu_s": time.process_time() - cpu0})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--target", required=True, help="host:port")
    p.add_argument("--model", required=True)
    p.add_argument("--images", type=Path, required=True)
    p.add_argument("--connections", type=int, default=64, help="concurrent callers in all")
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--duration", type=float, default=5.0, help="seconds measured")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds before measuring")
    args = p.parse_args()
    procs = max(1, min(args.processes, args.connections))
    share = [args.connections // procs + (k < args.connections % procs) for k in range(procs)]
    bodies = requests(args.model, args.images)  # before the fork: each worker has them
    queue = mp.get_context("fork").Queue()
    workers = [
        mp.get_context("fork").Process(target=worker, args=(args, bodies, c, 17 * k, queue))
        for k, c in enumerate(share)
    ]
    for w in workers:
        w.start()
    parts = [queue.get() for _ in workers]
    for w in workers:
        w.join()
    lat = sorted(x for part in parts for x in part["latencies"])
    errors: dict[str, int] = {}
    for part in parts:
        for code, n in part["errors"].items():
            errors[code] = errors.get(code, 0) + n

    def pct(q: float) -> float:
        return lat[min(len(lat) - 1, int(q * len(lat)))] * 1e6 if lat else float("nan")

    print(
        json.dumps(
            {
                "requests": len(lat) + sum(errors.values()),
                "duration_us": args.duration * 1e6,
                "non_2xx": sum(errors.values()),
                "errors": errors,
                "p50_us": pct(0.50),
                "p90_us": pct(0.90),
                "p99_us": pct(0.99),
                "mean_us": sum(lat) / len(lat) * 1e6 if lat else float("nan"),
                "max_us": lat[-1] * 1e6 if lat else float("nan"),
                # CPU seconds of the callers over the warm-up and the timed part (start-up,
                # imports and the fork left out).
                "cpu_s": sum(part["cpu_s"] for part in parts),
                "wall_s": args.warmup + args.duration,
            }
        )
    )


if __name__ == "__main__":
    main()
