"""Cut a wheel down to what the GPU image needs, so the carried wheels fit a call's 64 MB (benchmarks/gpu_wheels.sh).

    python benchmarks/wheels.py WHEEL --drop 'GLOB' [--drop 'GLOB' ...]

Rewrites WHEEL in place without the members matching any glob, and without their lines in its RECORD (pip installs
what RECORD lists and checks nothing that is gone). bitsandbytes 0.50.2 ships one 43 MB wheel with a library per CUDA
version (11.8 to 13.2) and per ROCm version; the image runs torch 2.11 on CUDA 13.0, which loads
libbitsandbytes_cuda130.so alone (its loader picks the library by torch.version.cuda), so the others go. Unsloth's
wheel (29 MB) holds its web UI (studio/, 82 MB unpacked), which training never imports.
"""

from __future__ import annotations

import argparse
import fnmatch
import os
import sys
import zipfile
from pathlib import Path


def cut(wheel: Path, drop: list[str]) -> tuple[int, int]:
    """Remove the members of `wheel` matching any of the `drop` globs; (bytes before, bytes after)."""
    before = wheel.stat().st_size
    tmp = wheel.with_name(f".{wheel.name}.tmp")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
        gone = {m.filename for m in src.infolist() if any(fnmatch.fnmatch(m.filename, g) for g in drop)}
        for member in src.infolist():
            if member.filename in gone:
                continue
            data = src.read(member)
            if member.filename.endswith(".dist-info/RECORD"):
                lines = data.decode().splitlines(keepends=True)
                data = "".join(line for line in lines if line.split(",", 1)[0] not in gone).encode()
            dst.writestr(member, data)
    os.replace(tmp, wheel)
    return before, wheel.stat().st_size


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("wheel", type=Path)
    parser.add_argument("--drop", action="append", default=[], help="glob of members to remove (repeatable)")
    args = parser.parse_args(argv)
    before, after = cut(args.wheel, args.drop)
    print(f"{args.wheel.name}: {before / 1e6:.1f} MB -> {after / 1e6:.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
