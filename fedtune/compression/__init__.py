"""Codecs for what crosses the wire (see ``base`` for the interface). Importing the package
registers every codec module in it."""

import importlib
import pkgutil

from fedtune.compression.base import CODECS, Codec, CodecError, Encoded, codec_for_encoding, make_codec

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["CODECS", "Codec", "CodecError", "Encoded", "codec_for_encoding", "make_codec"]
