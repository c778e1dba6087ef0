"""Do the ops' input errors raise, or crash the process? Diagnostics for the GPU machine's image.

Usage::

    python benchmarks/device_error_check.py

On the lent H200 (2026-12-04; torch 2.11.0+cu130, the image's gcc 13), an error message holding an
integer, formatted inside mergekernels._C, crashed the process (SIGSEGV in
``std::ostream::_M_insert<unsigned long>`` under ``c10::str``) instead of raising RuntimeError; the
same calls raise here. Each case runs in its own process; for the first that crashes, the script
prints the libstdc++ copies the process maps, whether ``_C`` defines iostream code itself, the
toolchain's flags, and the top of a cuda-gdb backtrace, so the next lease can name the cause.
Exits non-zero when any case crashes.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CASE = r"""
import sys, torch
sys.path.insert(0, {root!r})
import mergekernels
from tests.conftest import make_inputs
from tests.test_cuda_emulated import fused_args
OPS = torch.ops.mergekernels
case, dev = {case!r}, {dev!r}
base, fts = make_inputs(3, (5,), torch.float32, seed=1)
base, fts = base.to(dev), [x.to(dev) for x in fts]
flags = lambda n, dtype=torch.int32: torch.zeros(n, dtype=dtype, device=dev)
calls = {{
    "weights_count": lambda: OPS.fused_merge(*fused_args(base, fts, weights=[1.0, 2.0])),
    "flags_shape": lambda: OPS.fused_merge.default(*fused_args(base, fts, nonfinite=flags(3))),
    "flags_dtype": lambda: OPS.fused_merge.default(*fused_args(base, fts, nonfinite=flags(4, torch.int64))),
    "shape_mismatch": lambda: OPS.masked_drop(
        base, fts[0][:3], 0, 0, None, 0, 1.0, 0.0, 0.0, True, None, None, 1, 2, 0, 1),
}}
try:
    calls[case]()
    print("no error")
except RuntimeError as e:
    print("raised:", str(e).splitlines()[0][:100])
if {maps!r}:
    import mergekernels._C as ext
    print("maps:", sorted({{l.split()[-1] for l in open("/proc/self/maps") if "libstdc++" in l}}))
    print("extension:", ext.__file__)
"""

CASES = ["weights_count", "flags_shape", "flags_dtype", "shape_mismatch"]


def run_case(case: str, dev: str, maps: bool = False) -> subprocess.CompletedProcess:
    code = CASE.format(root=str(ROOT), case=case, dev=dev, maps=maps)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)


def diagnose(case: str, dev: str) -> None:
    """What the next lease needs to name the cause of a crash."""
    print(run_case("flags_dtype", dev, maps=True).stdout)  # a case that raises, with the maps
    ext = next((ROOT / "mergekernels").glob("_C*.so"), None)
    if ext and shutil.which("nm"):
        nm = subprocess.run(["nm", "-C", str(ext)], capture_output=True, text=True).stdout
        defined = [line for line in nm.splitlines() if "_M_insert<" in line]
        print("iostream inserts in _C:", defined[:4])
    print("CC/CXX/LDFLAGS/CXXFLAGS:", {k: os.environ.get(k) for k in ("CC", "CXX", "LDFLAGS", "CXXFLAGS")})
    # The 2026-12-04 build used /opt/gcc/bin/g++: does that toolchain link libstdc++ statically
    # (a second copy of iostreams in _C, which crashes as pytorch/pytorch#109923 describes)?
    compiler = os.environ.get("CXX", "c++")
    for args in (["--version"], ["-print-file-name=libstdc++.so"], ["-dumpspecs"]):
        out = subprocess.run([compiler, *args], capture_output=True, text=True).stdout.splitlines()
        keep = out[:1] if args[0] != "-dumpspecs" else [line for line in out if "static-libstdc++" in line]
        print(compiler, args[0], keep[:3])
    if ext and shutil.which("readelf"):
        dynamic = subprocess.run(["readelf", "-d", str(ext)], capture_output=True, text=True).stdout
        print(
            "NEEDED:", [line.split("[")[-1].rstrip("]") for line in dynamic.splitlines() if "NEEDED" in line]
        )
    if shutil.which("cuda-gdb"):
        code = CASE.format(root=str(ROOT), case=case, dev=dev, maps=False)
        script = Path("/tmp/mk_crash_case.py")
        script.write_text(code)
        cmd = ["timeout", "90", "cuda-gdb", "-q", "-batch", "-ex", "run", "-ex", "bt 12"]
        out = subprocess.run(cmd + ["--args", sys.executable, str(script)], capture_output=True, text=True)
        frames = [line[:200] for line in out.stdout.splitlines() if line.startswith("#")]
        print("\n".join(frames[:12]))


def main() -> int:
    import torch

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    crashed = []
    for dev in devices:
        for case in CASES:
            r = run_case(case, dev)
            last = (r.stdout + r.stderr).strip().splitlines()
            print(f"{dev:5s} {case:16s} rc {r.returncode:4d}  {last[-1][:110] if last else ''}")
            if r.returncode < 0 or r.returncode > 128:
                crashed.append((case, dev))
    if crashed:
        diagnose(*crashed[0])
    return 1 if crashed else 0


if __name__ == "__main__":
    sys.exit(main())
