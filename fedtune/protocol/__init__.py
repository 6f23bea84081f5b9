"""The wire contract (fedtune.proto, generated stubs) and how tensors travel on it."""

from fedtune.protocol import fedtune_pb2 as pb
from fedtune.protocol import fedtune_pb2_grpc as pb_grpc

__all__ = ["pb", "pb_grpc"]
