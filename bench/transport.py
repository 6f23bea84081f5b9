"""Throughput of the coordinator's gRPC upload and download paths on loopback, beside a bare
grpcio stream and a raw socket moving the same bytes, all measured in the same run.

    python bench/transport.py [--sizes 1 16 128] [--repeats 5] [--chunk-mib 3] [--out FILE]

Each push is a real PushUpdate through the coordinator's service: framing, chunking, header
checks against the plan, reassembly, NaN/Inf scan, and the trust rules' measure of the change
(its float64 norm and largest element) before the update is accepted; each fetch a real
FetchTask. The bare
stream is what any Python gRPC program pays to move the bytes: a client-streaming call of raw
byte chunks of the same size (no protobuf, no checks) into a preallocated buffer, and a
server-streaming call of the same chunks back; fedtune's path is compared with it best against
best (``upload_vs_bare``, ``download_vs_bare``: 1.0 means as fast as the bare stream). The
raw socket (one sendall() into a recv_into() buffer) is the ceiling of the loopback itself.
The device side (fetch, encode, push; or the bare client) runs in its own process, as on a real
deployment (``--same-process`` puts it in a thread of the server's process instead).
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
from concurrent import futures
from pathlib import Path

import grpc
import torch

from fedtune.config import RunConfig
from fedtune.coordinator.app import Coordinator
from fedtune.coordinator.global_model import FixedTensors
from fedtune.coordinator.guard import credentials
from fedtune.protocol import fedtune_pb2 as pb
from fedtune.protocol.stubs import coordinator_stub
from fedtune.protocol.tensors import CountedFrames, TensorReceiver, encode_tensors
from fedtune.transport import GRPC_OPTIONS

MB = 1024 * 1024
BARE = "bench.Bare"


def payload_tensor(size_mb: int) -> torch.Tensor:
    return torch.randn(size_mb * MB // 4, generator=torch.Generator().manual_seed(0))


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


# ---------------------------------------------------------------- the bare grpcio stream


def bare_server(payload: bytes, chunk_bytes: int) -> tuple[grpc.Server, int]:
    """A gRPC server with the coordinator's options and no protobuf: Upload reads byte chunks
    into a preallocated buffer and checks them; Download streams the payload in chunks."""

    def upload(chunks, context) -> bytes:
        buffer, filled = bytearray(len(payload)), 0
        for chunk in chunks:
            buffer[filled : filled + len(chunk)] = chunk
            filled += len(chunk)
        return b"ok" if buffer == payload else b"corrupt"

    def download(request, context):
        yield b"go"  # the timer starts here, as fedtune's starts at the task header
        view = memoryview(payload)
        for start in range(0, len(view), chunk_bytes):
            yield view[start : start + chunk_bytes].tobytes()

    handlers = {"Upload": grpc.stream_unary_rpc_method_handler(upload), "Download": grpc.unary_stream_rpc_method_handler(download)}
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=32), options=GRPC_OPTIONS)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(BARE, handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port


def bare_client_loop(port: int, repeats: int, chunk_bytes: int, size_mb: int) -> tuple[list[float], list[float]]:
    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=GRPC_OPTIONS)
    upload, download = channel.stream_unary(f"/{BARE}/Upload"), channel.unary_stream(f"/{BARE}/Download")
    view = memoryview(payload_tensor(size_mb).numpy()).cast("B")
    down, up = [], []
    try:
        for _ in range(repeats):
            chunks = iter(download(b""))
            next(chunks)
            start = time.perf_counter()
            buffer, filled = bytearray(len(view)), 0
            for chunk in chunks:
                buffer[filled : filled + len(chunk)] = chunk
                filled += len(chunk)
            down.append(time.perf_counter() - start)
            assert buffer == view

            start = time.perf_counter()
            reply = upload(view[i : i + chunk_bytes].tobytes() for i in range(0, len(view), chunk_bytes))
            up.append(time.perf_counter() - start)
            assert reply == b"ok", reply
    finally:
        channel.close()
    return down, up


def bare_seconds(size_mb: int, repeats: int, chunk_bytes: int, separate_process: bool) -> tuple[list[float], list[float]]:
    payload = payload_tensor(size_mb).numpy().tobytes()
    server, port = bare_server(payload, chunk_bytes)
    try:
        args = [port, repeats, chunk_bytes, size_mb]
        return _in_worker("--bare-worker", args) if separate_process else bare_client_loop(*args)
    finally:
        server.stop(None)


# ---------------------------------------------------------------- fedtune's coordinator


def client_loop(port: int, repeats: int, chunk_bytes: int) -> tuple[list[float], list[float]]:
    """A device's side: register, then per round fetch the adapter and push it back."""
    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=GRPC_OPTIONS)
    stub = coordinator_stub(channel)
    reply = stub.Register(pb.RegisterRequest(name="bench", num_examples=1))
    auth = credentials(reply.client_id, reply.token)
    down, up = [], []
    try:
        for _ in range(repeats):
            request = pb.FetchTaskRequest(client_id=reply.client_id, token=reply.token, wait_seconds=60)
            frames = iter(stub.FetchTask(request, metadata=auth))
            header = next(frames).task  # waits for the round to open: not transport time
            start = time.perf_counter()
            receiver = TensorReceiver()
            for frame in frames:
                receiver.feed(frame)
            received = receiver.finish()
            down.append(time.perf_counter() - start)

            head = pb.Frame(update=pb.UpdateHeader(client_id=reply.client_id, token=reply.token, round=header.round, num_examples=1, num_tensors=1))
            start = time.perf_counter()
            frames = CountedFrames(encode_tensors(received), chunk_bytes, head=head)
            stub.PushUpdate(iter(frames), metadata=auth)
            up.append(time.perf_counter() - start)
    finally:
        channel.close()
    return down, up


def _in_worker(flag: str, args: list[int]) -> tuple[list[float], list[float]]:
    out = subprocess.run([sys.executable, __file__, flag, *map(str, args)], check=True, capture_output=True, text=True).stdout
    down, up = json.loads(out.strip().splitlines()[-1])
    return down, up


def grpc_seconds(size_mb: int, repeats: int, chunk_bytes: int, separate_process: bool) -> tuple[list[float], list[float]]:
    """Download and upload seconds for a ``size_mb`` adapter through a live coordinator.

    With ``separate_process`` the device runs in its own Python process, as it would in a real
    deployment; otherwise in a thread of this one, sharing its interpreter lock with the server.
    """
    config = RunConfig()
    config.federation.rounds, config.federation.min_clients = repeats, 1
    config.server.address = "127.0.0.1:0"
    config.server.chunk_bytes = chunk_bytes
    config.server.max_update_bytes = 2 * size_mb * MB + MB
    with tempfile.TemporaryDirectory() as tmp:
        config.run_dir = str(Path(tmp) / "run")
        coordinator = Coordinator(config, global_model=FixedTensors({"adapter": payload_tensor(size_mb)}))
        port = coordinator.start()
        engine = threading.Thread(target=coordinator.engine.run, daemon=True)
        engine.start()
        try:
            args = [port, repeats, chunk_bytes]
            down, up = _in_worker("--client-worker", args) if separate_process else client_loop(*args)
            engine.join(timeout=120)
        finally:
            coordinator.stop()
    return down, up


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 16, 128], help="payload sizes in MiB")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--chunk-mib", type=float, default=3.0)
    parser.add_argument("--same-process", action="store_true", help="run the device in a thread of the server's process")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--client-worker", nargs=3, type=int, help=argparse.SUPPRESS)
    parser.add_argument("--bare-worker", nargs=4, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.client_worker:
        print(json.dumps(client_loop(*args.client_worker)))
        return 0
    if args.bare_worker:
        print(json.dumps(bare_client_loop(*args.bare_worker)))
        return 0
    chunk = int(args.chunk_mib * MB)
    rows = []
    for size in args.sizes:
        raw = min(raw_socket_seconds(payload_tensor(size).numpy().tobytes()) for _ in range(args.repeats))
        bare_down, bare_up = bare_seconds(size, args.repeats, chunk, not args.same_process)
        down, up = grpc_seconds(size, args.repeats, chunk, not args.same_process)
        rows.append({
            "name": f"{size}MiB",
            "size_mib": size,
            "raw_socket_mb_s": size / raw,
            "bare_grpc_mb_s": size / min(bare_up),
            "grpc_upload_mb_s": size / min(up),
            "grpc_upload_median_mb_s": size / statistics.median(up),
            "upload_vs_bare": min(bare_up) / min(up),
            "bare_grpc_download_mb_s": size / min(bare_down),
            "grpc_download_mb_s": size / min(down),
            "download_vs_bare": min(bare_down) / min(down),
        })
        print(f"measured {size} MiB", file=sys.stderr)
    where = "device in a thread of the server process" if args.same_process else "device in its own process"
    print(f"chunk size {args.chunk_mib} MiB, best of {args.repeats}, {where}; MB/s = MiB per second")
    print(f"{'MiB':>5} {'raw socket':>11} {'bare up':>8} {'fedtune up':>11} {'(median)':>9} {'up/bare':>8} {'bare down':>10} {'fedtune down':>13} {'down/bare':>10}")
    for r in rows:
        print(f"{r['size_mib']:>5} {r['raw_socket_mb_s']:>11.0f} {r['bare_grpc_mb_s']:>8.0f} {r['grpc_upload_mb_s']:>11.0f} {r['grpc_upload_median_mb_s']:>9.0f} "
              f"{r['upload_vs_bare']:>8.2f} {r['bare_grpc_download_mb_s']:>10.0f} {r['grpc_download_mb_s']:>13.0f} {r['download_vs_bare']:>10.2f}")
    result = {"chunk_mib": args.chunk_mib, "repeats": args.repeats, "separate_process": not args.same_process, "rows": rows}
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
