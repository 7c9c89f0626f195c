"""bench/sass_loops.py's loop finder on a hand-written SASS listing (no toolkit needed)."""
from __future__ import annotations

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "bench"))

from sass_loops import op_loops, registers  # noqa: E402

SASS = """
        Function : k_one
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   IMAD R2, R1, R1, RZ ;
        /*0020*/                   IMMA.16832.S8.S8 R4, R8.ROW, R12.COL, R16 ;
        /*0030*/                   FADD R4, R4, -12582912 ;
        /*0040*/               @P0 BRA 0x20 ;
        /*0050*/                   LDGSTS.E.BYPASS.128 [R3], desc[UR4][R6.64] ;
        /*0060*/               @P1 BRA 0x10 ;
        /*0070*/                   EXIT ;
        Function : k_two
        /*0000*/                   LDGSTS.E.BYPASS.128 [R3], desc[UR4][R6.64] ;
        /*0010*/               @P0 BRA 0x0 ;
        /*0020*/                   EXIT ;
"""


def test_loops_holding_an_op_and_their_sizes():
    loops = op_loops(SASS)
    # k_one: the inner loop 0x20-0x40 (3 instructions, 1 mma) inside 0x10-0x60 (6, 1 mma)
    assert loops == {"k_one": [(3, 1), (6, 1)], "k_two": []}
    assert op_loops(SASS, "LDGSTS") == {"k_one": [(6, 1)], "k_two": [(2, 1)]}


def test_registers_from_res_usage():
    text = ("Resource usage:\n Common:\n  GLOBAL:0\n Function k_one:\n  REG:120 STACK:0 SHARED:0\n"
            " Function k_two:\n  REG:64 STACK:0\n")
    assert registers(text) == {"k_one": 120, "k_two": 64}
