#!/usr/bin/env python3
"""Instruction counts of a kernel's tensor-core loops, from its SASS (no GPU needed): where an
issue-bound kernel (ncu: instructions issued near the scheduler's limit, DRAM and tensor pipes idle)
spends its instructions. Compiles a cuda/ module with nvcc as cuda_runtime does (-O3 --use_fast_math,
sm_90, the -D options given), disassembles it with cuobjdump, and for each kernel matching the
pattern prints its registers and every loop (backward branch) that holds an IMMA/HMMA (or --op):
static instruction count and how many of those. `--trips N` adds the dynamic count of one pass of
the outermost such loop when a rolled inner one runs N times in it (outer + (N - 1) * inner): for
gemm_i8_* the instructions of a 256-element stage (N = 4 windows of 64). --op LDGSTS lists the
cp.async copy loops (unrolled 4 to a pass).

    python3 bench/sass_loops.py mma_i8 'gemm_i8_q4_k_32$' -D ORCD_GEMM_I8_UNROLL=0 --trips 4
    python3 bench/sass_loops.py mma_i8 'gemm_i8_q4_k_32$' -D ORCD_GEMM_I8_UNROLL=1 --op LDGSTS
    git show REV:cuda/mma_i8.cu > cuda/_old.cu && python3 bench/sass_loops.py _old 'gemm_i8_q4_k_32$' --trips 4

cuobjdump and nvdisasm: the CUDA toolkit's, or PyPI's nvidia-cuda-cuobjdump and nvidia-cuda-nvdisasm
wheels (their nvidia/cu13/bin on PATH, or CUOBJDUMP=path).
"""
from __future__ import annotations

import argparse
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile

CUDA = pathlib.Path(__file__).resolve().parents[1] / "cuda"
_INSN = re.compile(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);")


def op_loops(sass: str, op: str = "IMMA|HMMA") -> dict[str, list[tuple[int, int]]]:
    """Per kernel, its loops (backward branches) holding an instruction matching `op`: (static
    instructions, how many match), smallest first."""
    out = {}
    for fn in re.split(r"\n\s*Function : ", sass)[1:]:
        name = fn.split("\n", 1)[0].strip()
        ins = [(int(a, 16), text) for a, text in _INSN.findall(fn)]
        hits = [a for a, text in ins if re.search(op, text)]
        loops = set()
        for a, text in ins:
            m = re.search(r"\bBRA\b.*?0x([0-9a-f]+)", text)
            if m and hits:
                target = int(m.group(1), 16)
                if target < a and any(target <= h <= a for h in hits):
                    body = [t for b, t in ins if target <= b <= a]
                    loops.add((len(body), sum(bool(re.search(op, t)) for t in body)))
        out[name] = sorted(loops)
    return out


def registers(res_usage: str) -> dict[str, int]:
    regs, name = {}, None
    for line in res_usage.splitlines():
        m = re.search(r"Function (\w+):", line)
        if m:
            name = m.group(1)
        m = re.search(r"REG:(\d+)", line)
        if m and name:
            regs[name] = int(m.group(1))
    return regs


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("module", help="cuda/<module>.cu")
    ap.add_argument("pattern", help="kernel names (a regex, searched)")
    ap.add_argument("-D", action="append", default=[], help="a -D option, as module_options gives them")
    ap.add_argument("--op", default="IMMA|HMMA", help="the instructions whose loops to list (a regex; LDGSTS: cp.async)")
    ap.add_argument("--trips", type=int, default=0, help="passes of a rolled inner loop per pass of the outermost")
    ap.add_argument("--arch", default="sm_90")
    args = ap.parse_args(argv)
    cuobjdump = os.environ.get("CUOBJDUMP") or shutil.which("cuobjdump")
    if not cuobjdump:
        sys.exit("cuobjdump not found: set CUOBJDUMP or put the toolkit's (or nvidia-cuda-cuobjdump's) bin on PATH")
    with tempfile.TemporaryDirectory() as tmp:
        cubin = pathlib.Path(tmp) / "k.cubin"
        subprocess.run(["nvcc", "-cubin", f"-arch={args.arch}", "-O3", "--use_fast_math", "-std=c++17", f"-I{CUDA}",
                        *(f"-D{d}" for d in args.D), "-o", str(cubin), str(CUDA / f"{args.module}.cu")], check=True)
        sass = subprocess.run([cuobjdump, "-sass", str(cubin)], check=True, capture_output=True, text=True).stdout
        res = subprocess.run([cuobjdump, "-res-usage", str(cubin)], check=True, capture_output=True, text=True).stdout
    regs = registers(res)
    for name, loops in sorted(op_loops(sass, args.op).items()):
        if not re.search(args.pattern, name):
            continue
        line = f"{name}: {regs.get(name, '?')} registers; loops with {args.op} (instructions, of them) {loops}"
        if args.trips and loops:
            outer, inner = loops[-1][0], loops[0][0]
            line += f"; per outer pass {outer + (args.trips - 1) * inner if len(loops) > 1 else outer}"
        print(line)


if __name__ == "__main__":
    main()
