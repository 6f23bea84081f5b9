"""Regenerate the Python stubs from ``fedtune.proto``.

Run from anywhere: ``python -m fedtune.protocol.generate``. It needs the ``grpcio-tools``
package (part of the ``dev`` extra). ``generate(out_dir)`` is also used by the test that checks
the checked-in stubs are current.
"""

from __future__ import annotations

import sys
from pathlib import Path

PROTOCOL_DIR = Path(__file__).resolve().parent
REPO_ROOT = PROTOCOL_DIR.parent.parent
PROTO_FILE = PROTOCOL_DIR / "fedtune.proto"
GENERATED = ("fedtune_pb2.py", "fedtune_pb2.pyi", "fedtune_pb2_grpc.py")


def generate(out_dir: Path) -> list[Path]:
    """Run protoc on fedtune.proto and write the stubs under ``out_dir/fedtune/protocol``.

    The proto is compiled relative to the repository root so the generated gRPC module imports
    ``fedtune.protocol.fedtune_pb2`` (a package import) rather than a top-level module.
    """
    from grpc_tools import protoc  # imported lazily: only developers need grpcio-tools

    out_dir.mkdir(parents=True, exist_ok=True)
    include = Path(protoc.__file__).resolve().parent / "_proto"
    args = [
        "protoc",
        f"-I{REPO_ROOT}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        str(PROTO_FILE.relative_to(REPO_ROOT)),
    ]
    code = protoc.main(args)
    if code != 0:
        raise RuntimeError(f"protoc failed with exit code {code}")
    return [out_dir / "fedtune" / "protocol" / name for name in GENERATED]


def main() -> int:
    import shutil
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        for path in generate(Path(tmp)):
            shutil.copyfile(path, PROTOCOL_DIR / path.name)
            print(f"wrote {PROTOCOL_DIR / path.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
