"""Throughput of the coordinator's gRPC upload (and download) path on loopback, beside a raw
loopback socket moving the same bytes, measured in the same run.

    python bench/transport.py [--sizes 1 16 128] [--repeats 3] [--chunk-mib 3] [--out FILE]

Each push is a real PushUpdate through the coordinator's service: framing, chunking, header
checks against the plan, reassembly, NaN/Inf scan. The device side (fetch, encode, push) runs in
its own process by default, as on a real deployment (``--same-process`` puts it in a thread of
the server's process, where both share one interpreter lock). The raw socket is the ceiling:
one sendall() into a preallocated recv_into() buffer.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
import torch

from fedtune.config import RunConfig
from fedtune.coordinator.app import Coordinator
from fedtune.coordinator.global_model import FixedTensors
from fedtune.protocol import fedtune_pb2 as pb
from fedtune.protocol import fedtune_pb2_grpc as pb_grpc
from fedtune.protocol.tensors import TensorReceiver, encode_tensors, tensor_frames
from fedtune.transport import GRPC_OPTIONS

MB = 1024 * 1024


def raw_socket_seconds(payload: bytes) -> float:
    """Seconds to move ``payload`` over a loopback TCP socket and get a one-byte ack."""
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    buffer = bytearray(len(payload))

    def receive() -> None:
        conn, _ = server.accept()
        with conn:
            view, got = memoryview(buffer), 0
            while got < len(buffer):
                got += conn.recv_into(view[got:], len(buffer) - got)
            conn.sendall(b"k")

    thread = threading.Thread(target=receive)
    thread.start()
    with socket.create_connection(("127.0.0.1", port)) as client:
        start = time.perf_counter()
        client.sendall(payload)
        client.recv(1)
        elapsed = time.perf_counter() - start
    thread.join()
    server.close()
    assert buffer == payload
    return elapsed


def client_loop(port: int, repeats: int, chunk_bytes: int) -> tuple[list[float], list[float]]:
    """A device's side: register, then per round fetch the adapter and push it back."""
    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=GRPC_OPTIONS)
    stub = pb_grpc.CoordinatorStub(channel)
    reply = stub.Register(pb.RegisterRequest(name="bench", num_examples=1))
    down, up = [], []
    try:
        for _ in range(repeats):
            request = pb.FetchTaskRequest(client_id=reply.client_id, token=reply.token, wait_seconds=60)
            frames = iter(stub.FetchTask(request))
            header = next(frames).task  # waits for the round to open: not transport time
            start = time.perf_counter()
            receiver = TensorReceiver()
            for frame in frames:
                receiver.feed(frame)
            received = receiver.finish()
            down.append(time.perf_counter() - start)

            head = pb.Frame(update=pb.UpdateHeader(client_id=reply.client_id, token=reply.token, round=header.round, num_examples=1, num_tensors=1))
            start = time.perf_counter()
            encoded = encode_tensors(received)
            stub.PushUpdate(iter([head, *tensor_frames(encoded, chunk_bytes)]))
            up.append(time.perf_counter() - start)
    finally:
        channel.close()
    return down, up


def grpc_seconds(size_mb: int, repeats: int, chunk_bytes: int, separate_process: bool) -> tuple[list[float], list[float]]:
    """Download and upload seconds for a ``size_mb`` adapter through a live coordinator.

    With ``separate_process`` the device runs in its own Python process, as it would in a real
    deployment; otherwise in a thread of this one, sharing its interpreter lock with the server.
    """
    tensor = torch.randn(size_mb * MB // 4, generator=torch.Generator().manual_seed(0))
    config = RunConfig()
    config.federation.rounds, config.federation.min_clients = repeats, 1
    config.server.address = "127.0.0.1:0"
    config.server.chunk_bytes = chunk_bytes
    config.server.max_update_bytes = 2 * size_mb * MB + MB
    with tempfile.TemporaryDirectory() as tmp:
        config.run_dir = str(Path(tmp) / "run")
        coordinator = Coordinator(config, global_model=FixedTensors({"adapter": tensor}))
        port = coordinator.start()
        engine = threading.Thread(target=coordinator.engine.run, daemon=True)
        engine.start()
        try:
            if separate_process:
                out = subprocess.run(
                    [sys.executable, __file__, "--client-worker", str(port), str(repeats), str(chunk_bytes)],
                    check=True, capture_output=True, text=True,
                ).stdout
                down, up = json.loads(out.strip().splitlines()[-1])
            else:
                down, up = client_loop(port, repeats, chunk_bytes)
            engine.join(timeout=120)
        finally:
            coordinator.stop()
    return down, up


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 16, 128], help="payload sizes in MiB")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--chunk-mib", type=float, default=3.0)
    parser.add_argument("--same-process", action="store_true", help="run the device in a thread of the server's process")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--client-worker", nargs=3, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.client_worker:
        print(json.dumps(client_loop(*args.client_worker)))
        return 0
    chunk = int(args.chunk_mib * MB)
    rows = []
    for size in args.sizes:
        payload = torch.randn(size * MB // 4).numpy().tobytes()
        raw = min(raw_socket_seconds(payload) for _ in range(args.repeats))
        down, up = grpc_seconds(size, args.repeats, chunk, not args.same_process)
        row = {
            "size_mib": size,
            "raw_socket_mb_s": size / raw,
            "grpc_upload_mb_s": size / min(up),
            "grpc_upload_median_mb_s": size / statistics.median(up),
            "grpc_download_mb_s": size / min(down),
            "upload_vs_raw": min(raw / u for u in up),
        }
        rows.append(row)
        print(f"measured {size} MiB", file=sys.stderr)
    header = f"{'MiB':>5} {'raw socket MB/s':>16} {'gRPC upload MB/s':>17} {'(median)':>9} {'gRPC download MB/s':>19} {'upload/raw':>11}"
    where = "device in a thread of the server process" if args.same_process else "device in its own process"
    print(f"chunk size {args.chunk_mib} MiB, best of {args.repeats}, {where}")
    print(header)
    for r in rows:
        print(f"{r['size_mib']:>5} {r['raw_socket_mb_s']:>16.0f} {r['grpc_upload_mb_s']:>17.0f} {r['grpc_upload_median_mb_s']:>9.0f} {r['grpc_download_mb_s']:>19.0f} {r['upload_vs_raw']:>11.2f}")
    result = {"chunk_mib": args.chunk_mib, "repeats": args.repeats, "separate_process": not args.same_process, "rows": rows}
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
