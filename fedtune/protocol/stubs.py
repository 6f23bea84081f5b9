"""The coordinator service on both ends of a channel, with fast framing on the tensor streams.

The generated code (``fedtune_pb2_grpc``) serializes every ``Frame`` through protobuf, which
copies each payload chunk into a message, again into the wire bytes, and again on every read of
the field at the other end. ``coordinator_stub`` and ``add_coordinator_to_server`` are the same
service with ``serialize_frame`` / ``parse_frame`` on the two tensor streams (FetchTask's
replies, PushUpdate's requests): a chunk is copied once from the tensor into gRPC's send buffer,
and once from the received message into the tensor being rebuilt. The bytes on the wire do not
change, so a peer using the generated stubs (or another language) talks to these unchanged.
"""

from __future__ import annotations

import grpc

from fedtune.protocol import fedtune_pb2 as pb
from fedtune.protocol import fedtune_pb2_grpc as pb_grpc
from fedtune.protocol.tensors import parse_frame, serialize_frame

SERVICE = "fedtune.v1.Coordinator"


def coordinator_stub(channel: grpc.Channel) -> pb_grpc.CoordinatorStub:
    """A stub whose FetchTask yields ``Frame`` messages or ``Chunk`` views, and whose
    PushUpdate sends both (``CountedFrames`` makes them)."""
    stub = pb_grpc.CoordinatorStub(channel)
    stub.FetchTask = channel.unary_stream(
        f"/{SERVICE}/FetchTask",
        request_serializer=pb.FetchTaskRequest.SerializeToString,
        response_deserializer=parse_frame,
        _registered_method=True,
    )
    stub.PushUpdate = channel.stream_unary(
        f"/{SERVICE}/PushUpdate",
        request_serializer=serialize_frame,
        response_deserializer=pb.PushReply.FromString,
        _registered_method=True,
    )
    return stub


def add_coordinator_to_server(servicer: pb_grpc.CoordinatorServicer, server: grpc.Server) -> None:
    """Serve ``servicer`` on ``server``; its PushUpdate receives ``Frame`` messages or ``Chunk``
    views, its FetchTask may yield either. The handlers are the generated ones (so a method
    added to fedtune.proto is served without touching this), with the two tensor streams'
    (de)serializers swapped."""
    generated = _Handlers()
    pb_grpc.add_CoordinatorServicer_to_server(servicer, generated)
    handlers = dict(generated.handlers)
    fetch, push = handlers["FetchTask"], handlers["PushUpdate"]
    handlers["FetchTask"] = grpc.unary_stream_rpc_method_handler(
        fetch.unary_stream, request_deserializer=fetch.request_deserializer, response_serializer=serialize_frame)
    handlers["PushUpdate"] = grpc.stream_unary_rpc_method_handler(
        push.stream_unary, request_deserializer=parse_frame, response_serializer=push.response_serializer)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_registered_method_handlers(SERVICE, handlers)


class _Handlers:
    """Stands in for a server to collect the handlers the generated code registers."""

    def __init__(self) -> None:
        self.handlers: dict[str, grpc.RpcMethodHandler] = {}

    def add_generic_rpc_handlers(self, _: object) -> None:
        pass

    def add_registered_method_handlers(self, service: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        self.handlers = handlers
