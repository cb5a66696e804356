"""Every kernel kind compiles for sm_90 with the installed Triton, on CPU (no GPU needed).

The interpreter runs the kernels' Python, not Triton's compiler, so it misses what only the
compiler checks (Triton 3.6 asserts that an int32 accumulator names out_dtype; 3.9 infers it).
The compiles run in a subprocess: under TRITON_INTERPRET=1 (set by conftest) `@triton.jit`
makes interpreter functions, which Triton cannot compile.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]
W4A16 = [  # kind, BLOCK_M, BLOCK_N, BLOCK_K, warps, stages, prefetch, self-reducing split-K
    # [, that sum's partials in flight]
    ("gemv", 1, 512, 64, 4, 1, True, True),
    ("gemm", 16, 64, 128, 4, 3, False, True),
    ("gemm_swap", 16, 64, 64, 4, 3, False, False),
    ("gemm_planes", 16, 64, 128, 4, 2, True, True),
    ("gemm_planes_xreg", 16, 64, 128, 4, 2, False, True),
    ("gemm_planes", 128, 128, 128, 8, 2, False, False),  # a large-M candidate
    ("mma", 16, 128, 128, 4, 1, False, True),  # inline PTX: only a real compile checks it
    ("mma", 8, 256, 128, 4, 1, False, False),  # 4 tiles per warp, one B tile
    ("mma", 8, 128, 128, 4, 1, False, True, 8),  # the split-K sum's loads unrolled by 8
    ("mma", 32, 128, 128, 4, 1, False, True),  # 4 B tiles
    ("mma", 64, 64, 128, 2, 1, False, True),  # 8 B tiles: 32 accumulators per A tile
    ("mma", 16, 128, 128, 4, 1, 1, True),  # the next BLOCK_K prefetched (tuples in the loop)
    ("mma", 32, 64, 64, 2, 1, 2, False),  # its words and scales only
    ("mma_w4a8", 16, 128, 128, 4, 1, False, True),  # W4A8 FP8: uint8 s2 / z, the rescale
    ("mma_w4a8", 64, 64, 64, 2, 1, True, False),
]
W4A8 = [  # kind, BLOCK_M, BLOCK_N, BLOCK_K, warps, stages, fp8 activations, [prefetch,
    # [natural-order xq (lane kernel), [split K reduced in the launch (lane kernel), [PDL]]]]
    # (quantize: [rounding slices per row, [PDL]])
    ("gemv", 1, 256, 64, 2, 1, False),
    ("gemm", 16, 64, 64, 4, 3, False),
    ("gemm", 128, 128, 64, 8, 3, False),
    ("gemm", 64, 64, 64, 4, 3, True),
    ("gemm_planes", 16, 64, 256, 4, 2, False),
    ("gemm_planes", 128, 128, 256, 8, 2, False),  # a large-M candidate
    ("gemm_swar", 256, 64, 128, 4, 3, False),  # inline PTX unpacking feeding int8 wgmma
    ("mma", 16, 128, 128, 4, 1, False),  # inline PTX unpacking + mma.sync m16n8k32
    ("mma", 64, 64, 64, 2, 1, False),
    ("gemm_swar", 256, 64, 128, 4, 3, False, True),  # the group-scale prefetch
    ("gemm_swar", 256, 128, 128, 8, 3, False, True),
    ("mma", 16, 128, 128, 4, 1, False, False, True),  # natural-order xq, PRMT per lane
    ("mma", 16, 128, 128, 4, 1, False, False, True, True),  # split K reduced in the launch
    ("mma", 8, 128, 128, 4, 1, False, False, True, 8),  # ... its partials' loads unrolled by 8
    ("mma", 16, 128, 128, 4, 1, False, False, True, "atomic"),  # ... summed by int32 atomics
    ("mma", 16, 128, 128, 4, 1, False, True, True),  # the next BLOCK_K's loads issued ahead
    ("mma", 16, 128, 128, 4, 1, False, True, True, 8),  # ... with the 16-row unrolled sum
    ("mma", 8, 128, 128, 4, 1, False, True, True, 8, True),  # PDL: weights, wait, then x
    ("mma", 8, 128, 128, 4, 1, False, False, True, 8, True),  # PDL without the prefetch
    ("int_mm", 0, 64, 128, 4, 1, False),  # the int8 unpacking kernel (SWAR PTX, interleave)
    ("int_mm", 0, 128, 256, 4, 1, False),  # two groups per tile (g128)
    ("int_mm", 0, 64, 128, 4, 1, True),  # e4m3 (q - z) for the block-scaled FP8 GEMM (fp8_mm)
    ("quantize", 0, 0, 2048, 8, 1, False),  # per-token quantize, two loops over x
    ("quantize", 1, 0, 32768, 16, 1, False),  # one pass: the row held in registers
    ("quantize", 1, 0, 4096, 4, 1, True),
    ("quantize", 1, 0, 32768, 16, 1, False, 8),  # one pass, a row's rounding over 8 programs
    ("quantize", 1, 0, 32768, 16, 1, False, 8, True),  # ... signalling a PDL GEMM at its start
]
KV4 = [  # kind, BLOCK_M, BLOCK_N, warps, stages, keys per channel over T tokens (0: per
    # token), query dtype (bf16 queries once hit a dot of mixed dtypes only a compile sees),
    # optionally the token-scale prefetch, [V staged through shared memory, [keys as 16 + code]]
    ("decode", 16, 64, 1, 3, 0, "fp16"),
    ("decode", 16, 64, 2, 3, 64, "fp16"),
    ("decode", 16, 32, 1, 3, 32, "bf16"),
    ("decode", 32, 32, 2, 3, 32, "bf16"),  # GQA 8 x 4 rows: BLOCK_M >= BLOCK_N
    ("decode", 16, 64, 1, 3, 0, "fp16", True),  # the token-scale prefetch
    ("decode", 16, 64, 1, 3, 0, "bf16", True, True),  # ... and V staged (STAGE_V)
    ("decode", 16, 64, 2, 3, 64, "fp16", False, True),  # keys per channel, V staged
    ("decode", 16, 64, 1, 3, 0, "fp16", True, True, True),  # ... keys as 16 + code (fp16 asm)
    ("prefill", 64, 64, 4, 2, 0, "bf16", False, False, True),  # (bf16 asm)
    ("prefill", 64, 64, 4, 2, 64, "bf16"),
    ("prefill", 64, 64, 4, 2, 0, "bf16"),
    ("key_write", 0, 0, 4, 1, 64, "bf16"),
]
SCRIPT = """
import json, sys
import sass_report as s
w4a16, w4a8, kv4 = json.loads(sys.argv[1])
out = []
for kind, bm, bn, bk, w, st, pf, split, *unroll in w4a16:
    try:
        variant = s.compile_variant(
            kind, bm, bn, bk, w, st, pf, split=split, reduce_unroll=(unroll + [1])[0]
        )
        regs = s.resources(variant)["REG"]
        out.append(["w4a16", kind, bm, regs, None])
    except Exception as e:
        out.append(["w4a16", kind, bm, 0, repr(e.__cause__ or e)[-800:]])
for kind, bm, bn, bk, w, st, fp8, *opt in w4a8:
    pf, natural, reduce, pdl = (opt + [False, False, False, False])[:4]
    slices = 1
    if kind == "quantize":  # its options: rounding slices per row, PDL
        pf, (slices, pdl) = 0, (opt + [1, False])[:2]
    try:
        variant = s.compile_w4a8_variant(
            kind, bm, bn, bk, w, st, fp8, prefetch=int(bool(pf)), x_natural=natural,
            self_reduce=bool(reduce), slices=slices,
            reduce_unroll=1 if reduce == "atomic" else max(1, int(reduce)),
            atomic=reduce == "atomic", pdl=pdl,
        )
        regs = s.resources(variant)["REG"]
        out.append(["w4a8", kind, bm, regs, None])
    except Exception as e:
        out.append(["w4a8", kind, bm, 0, repr(e.__cause__ or e)[-800:]])
for kind, bm, bn, w, st, t, dt, *opt in kv4:
    pf, stage_v, bias16 = (opt + [False, False, False])[:3]
    try:
        variant = s.compile_kv4_variant(kind, bm, bn, w, st, t, dt, pf, stage_v, bias16)
        regs = s.resources(variant)["REG"]
        out.append(["kv4", kind, bm, regs, None])
    except Exception as e:
        out.append(["kv4", kind, bm, 0, repr(e.__cause__ or e)[-800:]])
print(json.dumps(out))
"""


def _compile_offline(script: str, *args: str, timeout: int = 600):
    """Run `script` with the benchmarks on the path and without the interpreter; its last
    printed line, parsed as JSON."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT / "benchmarks"), str(ROOT), env.get("PYTHONPATH", "")]
    )
    run = subprocess.run(
        [sys.executable, "-c", script, *args],
        env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_every_kernel_kind_compiles_for_sm90():
    results = _compile_offline(SCRIPT, json.dumps([W4A16, W4A8, KV4]))
    assert len(results) == len(W4A16) + len(W4A8) + len(KV4)
    failed = [r for r in results if r[4] is not None]
    assert not failed, failed
    assert all(r[3] > 0 for r in results)  # a real cubin with registers allocated


V_GATHER = """
import collections, json
import sass_report as s
out = []
for stage_v, bias16 in ((False, False), (True, False), (True, True)):
    k = s.compile_kv4_variant("decode", 16, 64, 1, 3, 0, "fp16", True, stage_v, bias16)
    loop = s.main_loop(s.sass(k))
    out.append([len(loop), sum(" LDS.U8 " in line for line in loop)])
print(json.dumps(out))
"""

Q_ROWS = """
import json
import sass_report as s
out = []
for q_rows in (False, True):
    k = s.compile_kv4_variant("decode", 16, 32, 1, 3, 0, "fp16", True, True, False, q_rows)
    loop = s.main_loop(s.sass(k))
    out.append([len(loop), sum(s.opcode(line) == "MOV" for line in loop),
                s.resources(k)["STACK"], k.metadata.shared])
print(json.dumps([s.triton.__version__, out]))
"""


def test_query_read_as_rows_stays_in_registers_over_the_decode_loop():
    """Q_ROWS: the query's MMA operand is no longer re-read from shared memory and moved into
    place on every key tile (BLOCK_N 32, one warp, prefetch, STAGE_V; sm_90, Triton 3.6:
    1115 -> 1012 loop instructions, 107 -> 8 MOV when written) and less shared memory; with
    Triton 3.6 (the H100's) no spill. Triton 3.9 spills this kernel either way (48 -> 200 B
    of stack when written), so the switch would need its own timing there."""
    version, loops = _compile_offline(Q_ROWS, timeout=300)
    (plain_len, plain_mov, plain_stack, plain_smem), (rows_len, rows_mov, rows_stack, rows_smem) = (
        loops
    )
    assert rows_mov <= 16 < 64 <= plain_mov, (plain_mov, rows_mov)
    assert rows_len <= 0.93 * plain_len, (plain_len, rows_len)
    assert rows_smem < plain_smem, (rows_smem, plain_smem)
    if version.startswith("3.6."):
        assert plain_stack == rows_stack == 0, (plain_stack, rows_stack)


CAPPED = """
import json
import sass_report as s
out = []
for cap in (0, 184):
    k = s.compile_kv4_variant("decode", 16, 32, 1, 2, 0, "fp16", True, True, max_registers=cap)
    out.append([len(s.main_loop(s.sass(k))), s.resources(k)["REG"], s.resources(k)["STACK"]])
print(json.dumps([s.triton.__version__, out]))
"""


def test_register_cap_reaches_ptxas_and_costs_few_instructions():
    """`KernelConfig.max_registers` (Triton's maxnreg) on the shipped decode tile: 246 -> at
    most 184 registers per thread (8 -> 11 one-warp programs per SM), the loop at most 8%
    longer (1113 -> 1153 when written) and, with Triton 3.6 (the H100's), nothing spilled."""
    version, ((plain_len, plain_reg, _), (capped_len, capped_reg, capped_stack)) = _compile_offline(
        CAPPED, timeout=300
    )
    assert capped_reg <= 184 < plain_reg, (plain_reg, capped_reg)
    assert capped_len <= 1.08 * plain_len, (plain_len, capped_len)
    if version.startswith("3.6."):
        assert capped_stack == 0, capped_stack


def test_staged_v_is_not_gathered_byte_by_byte():
    """STAGE_V: the decode loop reads V's codes as words and the MMA operand back through
    ldmatrix (sm_90, Triton 3.6), where the plain kernel loads its 64 x 64 code bytes one at
    a time; the loop is >= 10% shorter (2431 -> 2106 instructions when written). Keys as
    16 + code (`_KEY_BIAS16`) shorten it again (2106 -> 2010)."""
    loops = _compile_offline(V_GATHER, timeout=300)
    (plain_len, plain_bytes), (staged_len, staged_bytes), (bias16_len, _) = loops
    assert plain_bytes >= 64 and staged_bytes == 0, (plain_bytes, staged_bytes)
    assert staged_len <= 0.9 * plain_len, (plain_len, staged_len)
    assert bias16_len <= 0.97 * staged_len, (staged_len, bias16_len)


RESIDENT = """
import json
import sass_report as s
out = {}
for rows in (4, 8, 16):
    k = s.compile_kv4_variant("decode_t", rows, 32, 1, 3, prefetch=True, stage_v=True,
                              q_rows=True)
    out[rows] = [s.resources(k)["REG"], k.metadata.shared]
print(json.dumps([s.triton.__version__, out]))
"""


def test_decode_t_tile_resources_match_the_wave_split_table():
    """`kv4_attention._DECODE_T_TILE` (registers, shared memory: what `_wave_split` fills an
    SM with) is the compiled decode_t tile's with Triton 3.6 (the H100's): 4 / 8 / 16 head
    columns -> 12 / 11 / 8 one-warp programs per sm_90 SM. Another Triton may allocate
    otherwise; there the tile must still leave >= 8 programs per SM."""
    from qcompile.lowering.kv4_attention import _DECODE_T_TILE, resident_programs

    version, resources = _compile_offline(RESIDENT, timeout=300)
    got = {int(rows): tuple(res) for rows, res in resources.items()}
    if version.startswith("3.6."):
        assert got == _DECODE_T_TILE, got
    assert [resident_programs(*_DECODE_T_TILE[r]) for r in (4, 8, 16)] == [12, 11, 8]
    assert all(resident_programs(*res) >= 8 for res in got.values()), got


REDUCE_PDL = """
import json
import sass_report as s
attn = s.compile_kv4_variant("decode_t", 4, 32, 1, 3, prefetch=True, stage_v=True,
                             q_rows=True, pdl=True)
plain = s.compile_kv4_variant("decode_t", 4, 32, 1, 3, prefetch=True, stage_v=True,
                              q_rows=True)
reduce = s.compile_kv4_variant("split_reduce", 0, 12, 4, 1, pdl=True)
print(json.dumps([
    "griddepcontrol.launch_dependents" in attn.asm["ptx"],
    "griddepcontrol.launch_dependents" in plain.asm["ptx"],
    "griddepcontrol.wait" in reduce.asm["ptx"],
    len(s.main_loop(s.sass(attn))), len(s.main_loop(s.sass(plain))),
]))
"""


def test_reduce_pdl_compiles_to_griddepcontrol_and_leaves_the_loop():
    """`_REDUCE_PDL`: the decode_t grid triggers its dependents (griddepcontrol
    .launch_dependents) and the split reduce waits for it (griddepcontrol.wait) on sm_90;
    the trigger is outside the loop (same loop length as without it)."""
    attn_trig, plain_trig, reduce_wait, attn_len, plain_len = _compile_offline(
        REDUCE_PDL, timeout=300
    )
    assert attn_trig and not plain_trig and reduce_wait
    assert attn_len == plain_len, (attn_len, plain_len)


KV4_PDL = """
import json
import sass_report as s
attn = s.compile_kv4_variant("decode_t", 4, 32, 1, 3, prefetch=True, stage_v=True,
                             q_rows=True, dependent=True)
write = s.compile_kv4_variant("write", 1, 128, 2, 1, dependent=True)
plain = s.compile_kv4_variant("write", 1, 128, 2, 1)
print(json.dumps([
    "griddepcontrol.wait" in attn.asm["ptx"],
    "griddepcontrol.launch_dependents" in attn.asm["ptx"],
    "griddepcontrol.wait" in write.asm["ptx"],
    "griddepcontrol.launch_dependents" in write.asm["ptx"],
    "griddepcontrol" in plain.asm["ptx"],
]))
"""


def test_kv4_pdl_compiles_to_griddepcontrol():
    """`_KV4_PDL` on sm_90: decode_t waits for its primary (griddepcontrol.wait) and, with
    its split reduce a second launch off, triggers nothing; the cache write waits and
    triggers its dependent; without the switch the write has neither."""
    assert _compile_offline(KV4_PDL, timeout=300) == [True, False, True, True, False]


T_KEYS = """
import json
import sass_report as s
out = []
for rows, t, dt in ((4, 0, "fp16"), (4, 64, "fp16"), (4, 64, "bf16"), (8, 64, "fp16"),
                    (16, 64, "fp16"), (4, 32, "fp16"), (4, 128, "fp16")):
    k = s.compile_kv4_variant("decode_t", rows, 32, 1, 3, key_tokens=t, dtype=dt, prefetch=True,
                              stage_v=True, q_rows=True, key_bias16=True)
    r = s.resources(k)
    out.append([rows, t, r["REG"], r["STACK"], k.metadata.shared, len(s.main_loop(s.sass(k)))])
print(json.dumps([s.triton.__version__, out]))
"""


def test_decode_t_keys_per_channel_tile_matches_its_wave_table():
    """decode_t over keys per channel: the halved key by one fp16 FMA per pair (offsets
    included, no per-tile q . o) keeps the loop within 1.35x of the per-token tile's (1004
    against 759 instructions at 4 columns when written; 1083 with q . o), with no spill; with
    Triton 3.6 its registers and shared memory at T = 64 are `_DECODE_T_KEY_TILE`'s (what
    its wave split fills an SM with: 10 programs at 4 and 8 columns), and at T = 32 / 128 no
    more. Another Triton (3.9: 203-216 registers) must still leave >= 8 programs per SM at 4
    and 8 columns, with no spill."""
    from qcompile.lowering.kv4_attention import _DECODE_T_KEY_TILE, resident_programs

    version, rows = _compile_offline(T_KEYS, timeout=600)
    (_, _, _, _, _, token_loop), *channels = rows
    for cols, t, regs, stack, smem, loop in channels:
        if cols <= 8:  # (16 columns: a 1241-instruction loop; Triton 3.9 spills 128 B)
            assert stack == 0, rows
            assert loop <= 1.35 * token_loop, (cols, t, loop, token_loop)
            assert resident_programs(regs, smem) >= 8, rows
        if version.startswith("3.6."):
            table = _DECODE_T_KEY_TILE[cols]
            assert (regs, smem) == table if t == 64 else regs <= table[0], rows
    assert [resident_programs(*_DECODE_T_KEY_TILE[c]) for c in (4, 8, 16)] == [10, 10, 8]


WGMMA = """
import collections, json
import sass_report as s
from qcompile.lowering.autotune import KernelConfig
from qcompile.lowering.w4a16 import _wgmma_smem_bytes
out = []
for bm, bn, bk, w, st, dt, split, bias, ws, *extra in json.loads(__import__("sys").argv[1]):
    k = s.compile_wgmma_variant(bm, bn, bk, w, st, dt, split, bias, 128, ws, *extra)
    text = s.sass(k)
    wide = text.count("LDS.64 ")
    lines = [line for line in text.splitlines() if "/*" in line]
    mma = [i for i, line in enumerate(lines) if "HGMMA" in line] or [0]
    moves = sum("IMAD.MOV" in line for line in lines[mma[0]:mma[-1]])  # (in the K loop)
    ops = collections.Counter(s.opcode(line) for line in text.splitlines() if "/*" in line)
    res = s.resources(k)
    cfg = KernelConfig("wgmma_rs_ws" if ws else "wgmma_rs", bm, bn, bk, split, w, st)
    out.append([res["REG"], res["STACK"] + res["LOCAL"], k.metadata.shared,
                _wgmma_smem_bytes(cfg), ops["HGMMA"], ops["UTMALDG"], ops["I2F"], ops["STS"],
                ops["PRMT"], ops["HFMA2"], text.count("DEPBAR.LE gsb0, 0x0"),
                len(s.wgmma_register_hazards(text)), moves, wide,
                text.count("WARPGROUP.ARRIVE")])
print(json.dumps(out))
"""


WGMMA8 = """
import collections, json
import sass_report as s
from qcompile.lowering.autotune import KernelConfig
from qcompile.lowering.w4a16 import _wgmma_smem_bytes
out = []
for bm, bn, bk, w, st, dt, split, bias, ws, *extra in json.loads(__import__("sys").argv[1]):
    k = s.compile_wgmma_variant(bm, bn, bk, w, st, dt, split, bias, 128, ws, *extra)
    text = s.sass(k)
    ops = collections.Counter(s.opcode(line) for line in text.splitlines() if "/*" in line)
    res = s.resources(k)
    cfg = KernelConfig("wgmma_rs", bm, bn, bk, split, w, st)
    out.append([res["REG"], res["STACK"] + res["LOCAL"], ops["IGMMA"], ops["PRMT"], ops["I2F"],
                len(s.wgmma_register_hazards(text)), text.count("WARPGROUP.ARRIVE"),
                k.metadata.shared, _wgmma_smem_bytes(cfg, 1), text.count("LDS.64 ")])
print(json.dumps(out))
"""


def test_wgmma_rs_gluon_kernel_compiles_for_sm90_as_its_config_rules_assume():
    """The Gluon wgmma_rs kernels (which the interpreter cannot run) compile for sm_90 in fp16
    and bf16, split or not, with a bias, with and without the producer warp: wgmma and TMA
    instructions, no spills, the unpacking in PRMT + HFMA2 with no int-to-float conversions
    and no shared-memory stores (W goes from registers to wgmma: the layout conversions that
    `assert_trivial` guards move no data), and the shared memory `valid_config` budgets."""
    variants = [
        (16, 64, 128, 4, 4, "fp16", 4, False, False),
        (64, 128, 128, 8, 4, "bf16", 1, True, False),
        (128, 128, 64, 8, 4, "fp16", 2, False, True),
        (256, 128, 64, 8, 3, "bf16", 1, True, True),
        (256, 64, 64, 4, 4, "fp16", 1, False, True),
    ]
    results = _compile_offline(WGMMA, json.dumps(variants))
    for v, r in zip(variants, results, strict=True):
        regs, spills, smem, budget, hgmma, tma, i2f, sts, prmt, hfma2, waits, hazards, moves, *_ = r
        assert regs > 0 and spills == 0, (v, r)
        assert hgmma > 0 and tma > 0 and i2f == 0, (v, r)
        assert sts <= (2 if v[-1] else 0), (v, r)  # (WS: two stores of partition state)
        assert prmt >= v[2] // 8 * 2 and hfma2 >= v[2] // 8 * 2, (v, r)  # per word per thread
        assert waits >= 1, (v, r)  # (each tile's wgmma waited for fully: see `_rs_step`)
        # nothing writes an in-flight wgmma's register operand (`wgmma_register_hazards`: the
        # first version's wait for one outstanding group had 46-148 such writes, and NaNs)
        assert hazards == 0, (v, r)
        # the K loop unrolled twice, two register tiles alternating: the one-step loop copied
        # each next tile into the registers its wgmma reads (46+ moves at 128 x 128 x 64 in
        # the whole kernel; 4-12 unrolled, Triton 3.6 and 3.9; counted from the first wgmma to
        # the last since `PAIRS`' row mapping added 8 in the prologue)
        assert moves <= 16 or v[0] < 64, (v, r)
        if v[-1]:  # + the stages' empty barriers and the partitions' own few hundred bytes
            assert budget < smem <= budget + 512, (v, smem, budget)
        else:
            assert smem == budget, (v, smem, budget)


def test_wgmma_rs_register_cap_compiles_within_it_unspilled():
    """Under a register cap of 96 (the producer-warp kernel's candidates below 128 x rows)
    it compiles within it, unspilled, hazard-free, and with the wgmmas still asynchronous:
    one warpgroup arrive per tile's group, not one per instruction (at 96 ptxas gives the
    plain wgmma_rs 72 registers by serializing its 8 wgmmas a tile: 24 arrives, against 3;
    caps of 80 / 88, which it kept asynchronous under, were no faster on the H100, session
    38)."""
    variants = [
        (16, 64, 128, 4, 4, "fp16", 2, False, True, 96),
        (64, 128, 128, 8, 4, "bf16", 1, True, True, 96),
        (16, 64, 128, 4, 4, "fp16", 1, False, False, 96),
    ]
    results = _compile_offline(WGMMA, json.dumps(variants))
    for v, r in zip(variants[:2], results, strict=False):
        assert r[0] <= v[-1] and r[1] == 0 and r[4] > 0 and r[7] <= 2 and r[11] == 0, (v, r)
        assert r[14] * 4 <= r[4], (v, r)  # (arrives vs HGMMAs)
    assert results[2][14] == results[2][4], results[2]  # (the serialized build, as a check)


def test_wgmma_rs_pair_rows_load_two_rows_per_instruction():
    """W4A16's `PAIRS` (shipped): the words come in 64-bit loads, two rows each
    (half the load instructions: one per two words a thread, against one per word), the
    relabelled layouts still convert into wgmma's operand for free (`assert_trivial`), no
    spills, no register hazards, no more registers than the plain kernel."""
    base = [
        (16, 64, 128, 4, 4, "fp16", 2, False, False),
        (64, 128, 128, 8, 4, "bf16", 1, True, True),
        (128, 128, 64, 8, 4, "fp16", 1, False, True),
    ]
    variants = [(*v, 0, False) for v in base] + [(*v, 0, True) for v in base]
    results = _compile_offline(WGMMA, json.dumps(variants))
    for v, plain, pairs in zip(base, results[:3], results[3:], strict=True):
        words = v[2] // 8 * 2  # (per thread and tile: two rows of BLOCK_K / 8 words)
        assert plain[13] == 0 and pairs[13] >= words // 2, (v, plain, pairs)  # (LDS.64)
        assert pairs[1] == 0 and pairs[11] == 0 and pairs[0] <= plain[0], (v, plain, pairs)
        assert pairs[8] == plain[8] and pairs[9] == plain[9], (v, plain, pairs)  # same unpack


def test_wgmma_rs_w4a8_mode_compiles_to_integer_wgmma():
    """W4A8's int8 mode of the wgmma_rs kernel: IGMMA
    (s8 x s8 -> s32) on the register operand, no spills, no register hazards, no float
    conversions in the unpacking, and the packed asm results reach the wgmma without being
    split into bytes and packed again (a handful of PRMT, against ~240 when int8 values
    crossed the loop's back edge), and the shared memory `_wgmma_smem_bytes` counts (its
    64-byte uint8 rows at BLOCK_N = 64 each take a 128-byte slot: TMA writes shared memory at
    128-byte aligned addresses, and 64-byte stages gave "misaligned address" on the H100);
    with the producer warp under a 96-register cap, within it."""
    variants = [
        (16, 64, 128, 4, 4, "fp16", 1, False, False, 0, False, True),
        (16, 64, 128, 4, 4, "fp16", 2, False, False, 0, False, True),
        (64, 128, 128, 8, 4, "bf16", 1, True, False, 0, False, True),
        (128, 128, 64, 8, 4, "fp16", 1, False, True, 0, False, True),
        # the producer-warp kernel under W4A16's 96-register cap (`w4a8._WGMMA_RS_WS`)
        (16, 64, 128, 4, 4, "fp16", 2, False, True, 96, False, True),
        (64, 64, 128, 4, 4, "bf16", 1, True, True, 96, False, True),
    ]
    for v, r in zip(variants, _compile_offline(WGMMA8, json.dumps(variants)), strict=True):
        regs, spills, igmma, prmt, i2f, hazards, arrives, smem, budget, _ = r
        assert regs <= (v[9] or 255), (v, r)
        assert budget < smem <= budget + 512 if v[8] else smem == budget, (v, r)  # (as above)
        assert igmma > 0 and spills == 0 and hazards == 0 and i2f == 0, (v, r)
        assert prmt <= 40, (v, r)
        assert arrives * 2 <= igmma, (v, r)  # (asynchronous: not one arrive per wgmma)


def test_wgmma_rs_w4a8_pair_rows_load_two_rows_per_instruction():
    """W4A8's words loaded in pairs (`w4a16_wgmma._W4A8_PAIRS`, on since session 39): the relabelled
    8-bit operand layout still converts for free (`assert_trivial`), the words come in 64-bit
    loads (none without), no spills or register hazards, no more registers than without."""
    base = [
        (16, 64, 128, 4, 4, "fp16", 1, False, False, 0),
        (16, 64, 128, 4, 4, "fp16", 2, False, True, 96),
        (64, 128, 128, 8, 4, "bf16", 1, True, False, 0),
        (128, 128, 64, 8, 4, "fp16", 1, False, True, 0),
    ]
    variants = [(*v, False, True) for v in base] + [(*v, True, True) for v in base]
    results = _compile_offline(WGMMA8, json.dumps(variants))
    for v, plain, pairs in zip(base, results[:4], results[4:], strict=True):
        words = v[2] // 32 * 2  # (per thread and tile: 2 rows x a quarter of BLOCK_K / 8 words)
        assert plain[9] == 0 and pairs[9] >= words, (v, plain, pairs)
        assert pairs[1] == 0 and pairs[5] == 0 and pairs[0] <= plain[0], (v, plain, pairs)
        assert pairs[2] == plain[2], (v, plain, pairs)  # (same IGMMAs)


VARIANTS = """
import json
import sass_report as s
from qcompile.lowering.autotune import KernelConfig
from qcompile.lowering.w4a16 import _wgmma_smem_bytes, _wgmma_sub
out = []
for bm, bn, bk, w, st, dt, ws, regs, w4a8, pipe in json.loads(__import__("sys").argv[1]):
    k = s.compile_wgmma_variant(bm, bn, bk, w, st, dt, ws=ws, maxnreg=regs, w4a8=w4a8, pipe=pipe)
    text = s.sass(k)
    res = s.resources(k)
    loop = s.ptx_k_loop(k.asm["ptx"])
    cfg = KernelConfig("wgmma_rs", bm, bn, bk, 1, w, st)
    budget = _wgmma_smem_bytes(cfg, 1 if w4a8 else 2, _wgmma_sub(cfg, 128))
    out.append({
        "regs": res["REG"], "spills": res["STACK"] + res["LOCAL"],
        "hazards": len(s.wgmma_register_hazards(text)), "wait0": text.count("DEPBAR.LE gsb0, 0x0"),
        "wait1": text.count("DEPBAR.LE gsb0, 0x1"), "arrives": text.count("WARPGROUP.ARRIVE"),
        "gmma": text.count("GMMA."), "loop_wgmma": loop["wgmma"], "loop_tma": loop["tma"],
        "loop_bar": loop["bar"], "smem": k.metadata.shared, "budget": budget,
    })
print(json.dumps([__import__("triton").__version__, out]))
"""


def test_wgmma_rs_pipe_leaves_one_wgmma_in_flight_without_hazards():
    """`w4a16_wgmma._PIPE` (`_pipe`: on for the W4A16 producer warp at 256 x rows): the K
    loop waits for one outstanding wgmma group instead of none, and the in-flight tile's W
    registers are not written before the wait that retires it (the hazard check counts
    groups committed since), for W4A16 and W4A8, with and without the producer warp: no
    spills, the wgmmas as asynchronous as without it (the same arrives), at most 16 more
    registers (Triton 3.6: none more but W4A8's 64 x rows, 80 -> 93)."""
    base = [
        (16, 64, 128, 4, 4, "fp16", False, 0, False),
        (256, 128, 64, 8, 4, "bf16", False, 0, False),
        (256, 128, 64, 8, 4, "fp16", True, 0, False),
        (16, 64, 128, 4, 4, "fp16", True, 96, False),
        (64, 128, 128, 8, 4, "fp16", False, 0, True),
        (128, 128, 64, 8, 4, "fp16", False, 0, True),
    ]
    variants = [(*v, False) for v in base] + [(*v, True) for v in base]
    _, results = _compile_offline(VARIANTS, json.dumps(variants))
    n = len(base)
    for v, plain, pipe in zip(base, results[:n], results[n:], strict=True):
        assert plain["hazards"] == pipe["hazards"] == 0, (v, plain, pipe)
        assert plain["spills"] == pipe["spills"] == 0, (v, plain, pipe)
        assert plain["wait1"] == 0 and pipe["wait1"] >= 2 and pipe["wait0"] <= 1, (v, plain, pipe)
        assert (pipe["arrives"], pipe["gmma"]) == (plain["arrives"], plain["gmma"]), (
            v,
            plain,
            pipe,
        )
        assert pipe["regs"] <= plain["regs"] + 16 and pipe["regs"] <= (v[7] or 255), (
            v,
            plain,
            pipe,
        )


def test_wgmma_rs_two_group_tiles_halve_the_k_loops_copies_and_barriers():
    """`w4a16._SUBTILES` (on for W4A16's wgmma_rs since session 40): a 256-k TMA stage of
    two 128-k groups, unpacked and multiplied one after the other, against 128-k stages
    (twice the stages, the same bytes in flight): per wgmma half the TMA copies and, with
    Triton 3.6, half the CTA barriers in the K loop's steady state; no spills or hazards, the
    wgmmas as asynchronous (no more warpgroup arrives), registers within 16 of the 128-k
    kernel's (both unpack 128 k at a time), and the shared memory `_wgmma_smem_bytes` counts (two scale rows a stage) for fp16, bf16, `_PIPE` and W4A8; the
    producer-warp kernel compiles too."""
    pairs = [
        ((16, 64, 128, 4, 4, "fp16", False, 0, False, False),
         (16, 64, 256, 4, 2, "fp16", False, 0, False, False)),
        ((64, 128, 128, 8, 4, "bf16", False, 0, False, False),
         (64, 128, 256, 8, 2, "bf16", False, 0, False, False)),
        ((16, 64, 128, 4, 4, "fp16", False, 0, False, True),
         (16, 64, 256, 4, 2, "fp16", False, 0, False, True)),
        ((16, 64, 128, 4, 4, "fp16", False, 0, True, False),
         (16, 64, 256, 4, 2, "fp16", False, 0, True, False)),
        ((16, 64, 128, 4, 4, "fp16", True, 96, False, False),
         (16, 64, 256, 4, 2, "fp16", True, 96, False, False)),
    ]  # fmt: skip
    variants = [v for pair in pairs for v in pair]
    version, results = _compile_offline(VARIANTS, json.dumps(variants))
    for (_, v2), one, two in zip(pairs, results[::2], results[1::2], strict=True):
        assert two["spills"] == 0 and two["hazards"] == 0, (v2, two)
        # (no more arrives: not serialized; one fewer without the 128-k kernel's odd tail)
        assert two["arrives"] <= one["arrives"], (v2, one, two)
        assert two["regs"] <= one["regs"] + 16, (v2, one, two)
        if v2[6]:  # (the producer warp issues the copies: none in the consumers' loop)
            continue
        assert two["smem"] == two["budget"] and one["smem"] == one["budget"], (v2, one, two)
        # per 2 x 128 k
        assert two["loop_wgmma"] == one["loop_wgmma"], (v2, one, two)
        assert two["loop_tma"] * 2 == one["loop_tma"], (v2, one, two)
        if version.startswith("3.6."):
            assert two["loop_bar"] * 2 == one["loop_bar"], (v2, one, two)


def test_wgmma_register_hazard_check_finds_writes_to_an_inflight_operand():
    """The checker itself, on hand-written SASS: a loop whose HGMMA reads R88..R91, waited for
    with one group still allowed in flight, and the next iteration's load into R88 (what ptxas
    did to the first wgmma_rs version) is a hazard; the same load after a full wait is not,
    nor after a wait for one that follows a later group (`_PIPE`)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import sass_report
    finally:
        sys.path.pop(0)

    def loop(wait: str) -> str:
        return "\n".join([
            ".L_x_4:",
            "        /*0100*/                   LDS R88, [R7+0x10620] ;",
            "        /*0110*/                   HFMA2 R89, R89, R103.H0_H0, R6.H0_H0 ;",
            "        /*0120*/                   WARPGROUP.ARRIVE ;",
            "        /*0130*/                   HGMMA.64x128x16.F32 R24, R88, gdesc[UR12], R24, gsb0 ;",
            f"        /*0140*/                   WARPGROUP.DEPBAR.LE gsb0, {wait} ;",
            "        /*0150*/                   STS [R2], R88 ;",
            "        /*0160*/               @P0 BRA `(.L_x_4) ;",
        ])  # fmt: skip

    found = sass_report.wgmma_register_hazards(loop("0x1"))
    assert len(found) == 2 and all("of the HGMMA at 0x130" in f for f in found), found
    assert sass_report.wgmma_register_hazards(loop("0x0")) == []

    # `_PIPE`'s shape: two tiles alternate registers (R88 / R92), each group left in flight by
    # a wait for one outstanding group, and a tile's registers refilled only after the wait
    # that follows the next group: no hazard. Refilling R88 one wait too early is one.
    def pipe(early: bool) -> str:
        refill = "        /*0135*/                   LDS R88, [R7+0x10620] ;"
        return "\n".join([
            ".L_x_5:",
            "        /*0100*/                   WARPGROUP.ARRIVE ;",
            "        /*0110*/                   HGMMA.64x128x16.F32 R24, R88, gdesc[UR12], R24, gsb0 ;",
            "        /*0120*/                   WARPGROUP.DEPBAR.LE gsb0, 0x1 ;",
            *([refill] if early else []),
            "        /*0130*/                   LDS R92, [R7+0x10640] ;",
            "        /*0140*/                   WARPGROUP.ARRIVE ;",
            "        /*0150*/                   HGMMA.64x128x16.F32 R24, R92, gdesc[UR12], R24, gsb0 ;",
            "        /*0160*/                   WARPGROUP.DEPBAR.LE gsb0, 0x1 ;",
            "        /*0170*/                   LDS R88, [R7+0x10620] ;",
            "        /*0180*/               @P0 BRA `(.L_x_5) ;",
        ])  # fmt: skip

    assert sass_report.wgmma_register_hazards(pipe(early=False)) == []
    found = sass_report.wgmma_register_hazards(pipe(early=True))
    assert len(found) == 1 and "of the HGMMA at 0x110" in found[0], found
