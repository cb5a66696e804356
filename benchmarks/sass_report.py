"""Static report of the W4A16 and W4A8 kernels' machine code, no GPU needed.

Compiles each kernel variant for sm_90 with Triton's bundled ptxas, disassembles it, finds the
main K loop and counts its instructions by kind, then divides by the weights one thread
handles per iteration. At full HBM bandwidth an H100 SM must retire ~23 int4 weights per
clock, i.e. at most ~128/23 = 5.5 issued instructions per weight; above that the kernel is
issue-bound before it is memory-bound.

    python benchmarks/sass_report.py            # prints a table, writes nothing
"""

from __future__ import annotations

import collections
import inspect
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from qcompile.lowering import w4a8 as w4a8_kernels
from qcompile.lowering import w4a16 as kernels

TARGET = GPUTarget("cuda", 90, 32)
COMMON_SIG = {
    "x_ptr": "*fp16", "qw_ptr": "*i32", "s_ptr": "*fp16", "o_ptr": "*fp16", "bias_ptr": "*fp16",
    "out_ptr": "*fp16", "ws_ptr": "*fp32", "cnt_ptr": "*i32", "M": "i32", "N": "i32", "K": "i32",
    "k_per_split": "i32", "stride_w": "i32", "stride_xm": "i32", "stride_xk": "i32",
    "stride_om": "i32", "stride_split": "i32",
}  # fmt: skip
# Dynamo-style specialization: pointers and sizes divisible by 16, unit stride along K.
ATTRS = {(i,): [["tt.divisibility", 16]] for i in (0, 1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 13, 15)}


def compile_variant(
    kind: str, bm: int, bn: int, bk: int, warps: int, stages: int, prefetch: int = 0,
    group: int = 128, split: bool = False, reduce_unroll: int = 1, pdl: bool = False,
):  # fmt: skip
    """A W4A16 kernel for sm_90 (contiguous x, no bias); `split`: the self-reducing split-K
    epilogue (the lane kernel's sum `reduce_unroll` partials at a time); `pdl`: the lane
    kernel's programmatic-dependent-launch mode."""
    sig = dict(COMMON_SIG)
    # stride_xk == 1 is specialized as a constant by Triton at launch for contiguous x.
    consts = {
        "GROUP": group,
        "HAS_BIAS": False,
        "SPLIT": split,
        "SELF_REDUCE": split,
        "BLOCK_N": bn,
        "BLOCK_K": bk,
        "stride_xk": 1,
        "X_PLANES": False,  # x in natural order (a defaulted constexpr must still be given)
    }
    fn = kernels._w4a16_gemv_kernel
    sig["nibble_mask"] = "i32"
    consts["PREFETCH"] = prefetch
    if kind in ("gemm", "gemm_swap"):
        del consts["PREFETCH"]
    if kind == "gemm":
        del sig["nibble_mask"]
        fn = kernels._w4a16_gemm_kernel
        consts.update(BLOCK_M=bm, GROUP_M=8, SWAP_AB=False)
    if kind in ("gemm_planes", "gemm_planes_xreg", "gemm_planes_direct"):
        fn = kernels._w4a16_gemm_planes_kernel
        consts.update(
            BLOCK_M=bm, SWAP_AB=kind != "gemm_planes_direct", X_IN_REGS=kind == "gemm_planes_xreg"
        )
    if kind == "gemm_swap":
        del sig["nibble_mask"]
        fn = kernels._w4a16_gemm_kernel
        consts.update(BLOCK_M=bm, GROUP_M=8, SWAP_AB=True)
    if kind in ("mma", "mma_w4a8"):  # mma_w4a8: W4A8's FP8 path (uint8 s2 / z, rescale)
        del sig["nibble_mask"]
        fn = kernels._w4a16_mma_kernel
        consts.update(M_TILES=bm // 8, N_TILES=bn // (16 * warps), ASM=True)
        params = inspect.signature(fn.fn).parameters
        if "REDUCE_UNROLL" in params:  # (older commits lack it)
            consts["REDUCE_UNROLL"] = reduce_unroll
        if "PDL" in params:
            consts["PDL"] = pdl
        if kind == "mma_w4a8":
            sig.update(s_ptr="*u8", o_ptr="*u8", xs_ptr="*fp32", s1_ptr="*fp32")
            consts["W4A8"] = True
        else:  # (every defaulted argument given: left out, newer Tritons compile it as None)
            consts.update(W4A8=False, xs_ptr=None, s1_ptr=None)
    sig.update({name: "constexpr" for name in consts})
    src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=ATTRS)
    return triton.compile(src, target=TARGET, options={"num_warps": warps, "num_stages": stages})


W4A8_SIG = {
    "xq_ptr": "*i8", "xs_ptr": "*fp32", "qw_ptr": "*i32", "s2_ptr": "*u8", "z_ptr": "*u8",
    "s1_ptr": "*fp32", "bias_ptr": "*fp16", "out_ptr": "*fp16", "M": "i32", "N": "i32",
    "K": "i32", "k_per_split": "i32", "stride_xm": "i32", "stride_xk": "i32",
    "stride_om": "i32", "stride_split": "i32",
}  # fmt: skip
W4A8_ATTRS = {(i,): [["tt.divisibility", 16]] for i in (0, 1, 2, 3, 4, 5, 7, 8, 9, 10, 11, 12, 14)}


def compile_w4a8_variant(
    kind: str, bm: int, bn: int, bk: int, warps: int, stages: int, fp8: bool = False,
    group: int = 128, prefetch: int = 0, x_natural: bool = False, self_reduce: bool = False,
    slices: int = 1, reduce_unroll: int = 1, atomic: bool = False, pdl: bool = False,
):  # fmt: skip
    """A W4A8 GEMM kernel for sm_90 (contiguous xq, no bias, final output); kind "int_mm":
    the int_mm path's unpacking kernel (BLOCK_N x BLOCK_K, bm and stages unused); kind
    "quantize": the per-token quantize kernel (BLOCK = bk, one pass over x when bm = 1, each
    row's rounding spread over `slices` programs)."""
    if kind == "quantize":
        fn = w4a8_kernels._quantize_per_token_kernel
        consts = {"QMAX": 448 if fp8 else 127, "FP8": fp8, "BLOCK": bk, "PLANES_BK": 0,
                  "EVEN_ODD_BK": 0, "ONE_PASS": bm == 1, "stride_xk": 1,
                  "SLICES": slices, "PDL": pdl}  # fmt: skip
        sig = {"x_ptr": "*fp16", "xq_ptr": "*fp8e4nv" if fp8 else "*i8", "scale_ptr": "*fp32",
               "K": "i32", "stride_xm": "i32",
               **dict.fromkeys(consts, "constexpr")}  # fmt: skip
        attrs = {(i,): [["tt.divisibility", 16]] for i in range(5)}
        src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
        opts = {"num_warps": warps, "enable_fp_fusion": False}
        return triton.compile(src, target=TARGET, options=opts)
    if kind == "int_mm":
        fn = w4a8_kernels._w4a8_unpack_kernel
        consts = {"GROUP": group, "BLOCK_N": bn, "BLOCK_K": bk, "ASM": True, "FP8": fp8}
        sig = {"qw_ptr": "*i32", "s2_ptr": "*u8", "z_ptr": "*u8", "w8_ptr": "*i8", "N": "i32",
               "K": "i32", **dict.fromkeys(consts, "constexpr")}  # fmt: skip
        attrs = {(i,): [["tt.divisibility", 16]] for i in range(6)}
        src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
        return triton.compile(src, target=TARGET, options={"num_warps": warps})
    sig = dict(W4A8_SIG)
    if fp8:
        sig["xq_ptr"] = "*fp8e4nv"
    consts = {
        "GROUP": group, "HAS_BIAS": False, "WRITE_ACC": False, "BLOCK_N": bn, "BLOCK_K": bk,
        "stride_xk": 1,
    }  # fmt: skip
    if kind == "gemv":
        fn = w4a8_kernels._w4a8_gemv_kernel
        consts["FP8"] = fp8
    elif kind == "gemm":
        fn = w4a8_kernels._w4a8_gemm_kernel
        consts.update(FP8=fp8, BLOCK_M=bm, GROUP_M=8)
    elif kind == "mma":  # self_reduce: a split's int32 partial, the last split rescales
        fn = w4a8_kernels._w4a8_mma_kernel
        consts.update(
            M_TILES=bm // 8, ASM=True, X_NATURAL=x_natural, SELF_REDUCE=self_reduce,
            PREFETCH=bool(prefetch), PDL=pdl,
        )  # fmt: skip
        if self_reduce:
            consts.update(WRITE_ACC=True, REDUCE_UNROLL=reduce_unroll, ATOMIC=atomic)
            sig.update(out_ptr="*i32", final_ptr="*fp16", cnt_ptr="*i32")
        else:
            consts.update(final_ptr=None, cnt_ptr=None, REDUCE_UNROLL=1, ATOMIC=False)
    elif kind == "gemm_swar":
        fn = w4a8_kernels._w4a8_gemm_swar_kernel
        consts.update(BLOCK_M=bm, PREFETCH=prefetch, ASM=True)
    else:
        fn = w4a8_kernels._w4a8_gemm_planes_kernel
        consts["BLOCK_M"] = bm
    sig.update({name: "constexpr" for name in consts})
    src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=W4A8_ATTRS)
    return triton.compile(src, target=TARGET, options={"num_warps": warps, "num_stages": stages})


def _kv4_signature(fn, pointers: dict[str, str], consts: dict) -> tuple[dict, dict]:
    """Signature and attrs of a KV4 kernel: pointers as given (default *fp16), other
    non-constexpr arguments i32 (qk_scale fp32), all divisible by 16 (as at launch)."""
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = pointers.get(name, "*fp16")
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name == "qk_scale":
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
            if name not in ("Sq", "S", "Sn", "rows_total") and not name.endswith(("_qd", "_kd")):
                attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, attrs


def compile_kv4_variant(
    kind: str, bm: int, bn: int, warps: int, stages: int, key_tokens: int = 0,
    dtype: str = "fp16", prefetch: bool = False, stage_v: bool = False, key_bias16: bool = False,
    q_rows: bool = False, max_registers: int = 0, center_v: bool = True, mask_kind: int = 0,
    fp16_keys: bool = False, pdl: bool = False, dependent: bool = False,
):  # fmt: skip
    """A KV4 kernel for sm_90: "decode"/"prefill" (`_kv4_decode_kernel`, fp16 query, no mask,
    split partials for decode; key_tokens > 0: keys per channel), "decode_t"
    (`_kv4_decode_t_kernel`, bm = its ROWS, q_rows: its SWAP_PAIRS, key_bias16: its KEY_MASK,
    key_tokens: its KEY_TOKENS)
    or "write" (the per-token K/V write, bm = BLOCK_T, bn = G) or "key_write" (the
    per-channel key write kernel, T = key_tokens) or "split_reduce" (bn splits, D = 128);
    dtype: the query's (and residual's), fp16 or bf16; max_registers: ptxas's cap per thread
    (0: none); pdl: decode_t triggers its dependents, split_reduce waits for its primary;
    dependent (`_KV4_PDL`): decode_t and write wait for their primary, write triggers."""
    from qcompile.lowering import kv4_attention as kv4

    if kind == "split_reduce":
        fn = kv4._kv4_split_reduce_kernel
        consts = {"SPLITS": bn, "SPLITS_POW2": triton.next_power_of_2(bn), "D": 128, "PDL": pdl}
        pointers = {"part_ptr": "*fp32", "lse_ptr": "*fp32", "out_ptr": f"*{dtype}"}
    elif kind == "decode_t":
        fn = kv4._kv4_decode_t_kernel
        consts = {
            "HKV": 8, "GQA": 4, "D": 128, "Q_BIAS_BITS": 0x6400 if dtype == "fp16" else 0x4300,
            "HAS_LENS": True, "MASK_KIND": mask_kind, "WRITE_PARTIAL": True, "ROWS": bm,
            "BLOCK_N": bn,
            "ASM": True, "SELF_REDUCE": True, "SCALE_PREFETCH": prefetch, "STAGE_V": stage_v,
            "CENTER_V": center_v, "WIDE": False, "COMBINE_ROWS": 4, "SWAP_PAIRS": q_rows,
            "KEY_MASK": key_bias16, "FP16_KEYS": fp16_keys, "LAUNCH_DEPENDENTS": pdl,
            "KEY_TOKENS": key_tokens, "WAIT": dependent,
        }  # fmt: skip
        pointers = {"kc_ptr": "*u8", "vc_ptr": "*u8", "lens_ptr": "*i32", "mask_ptr": "*fp16",
                    "out_ptr": "*fp32", "lse_ptr": "*fp32", "cnt_ptr": "*i32",
                    "q_ptr": f"*{dtype}", "kr_ptr": f"*{dtype}", "final_ptr": f"*{dtype}"}  # fmt: skip
    elif kind == "write":  # the per-token K/V write, G = bn, BLOCK_T = bm
        fn = kv4._kv4_cache_write_kernel
        # unit channel strides, as Triton specializes them at launch
        consts = {"HKV": 8, "D": 128, "G": bn, "BLOCK_T": bm, "WRITE_K": True,
                  "stride_kd": 1, "stride_vd": 1, "PDL": dependent}  # fmt: skip
        pointers = {"kc_ptr": "*u8", "vc_ptr": "*u8", "pos_ptr": "*i64", "k_ptr": f"*{dtype}",
                    "v_ptr": f"*{dtype}"}  # fmt: skip
    elif kind == "key_write":
        fn = kv4._kv4_key_channels_write_kernel
        consts = {"HKV": 8, "D": 128, "T": key_tokens}
        pointers = {"kc_ptr": "*u8", "pos_ptr": "*i64", "k_ptr": f"*{dtype}", "kr_ptr": f"*{dtype}"}
    else:
        fn = kv4._kv4_decode_kernel
        consts = {
            "HKV": 8, "GQA": 4, "D": 128, "Q_BIAS_BITS": 0x6400 if dtype == "fp16" else 0x4300,
            "HAS_LENS": True,
            "IS_CAUSAL": kind == "prefill", "MASK_KIND": mask_kind,
            "WRITE_PARTIAL": kind == "decode",
            "BLOCK_M": bm, "BLOCK_N": bn, "ASM": True, "SELF_REDUCE": kind == "decode",
            "FOLD_UNIT": True, "KEY_TOKENS": key_tokens, "SCALE_PREFETCH": prefetch,
            "STAGE_V": stage_v, "KEY_BIAS16": key_bias16, "Q_ROWS": q_rows,
            "COMBINE_ROWS": 4, "CENTER_V": center_v,
        }  # fmt: skip
        pointers = {"kc_ptr": "*u8", "vc_ptr": "*u8", "lens_ptr": "*i32", "mask_ptr": "*fp16",
                    "out_ptr": "*fp32", "lse_ptr": "*fp32", "cnt_ptr": "*i32",
                    "q_ptr": f"*{dtype}", "kr_ptr": f"*{dtype}", "final_ptr": f"*{dtype}"}  # fmt: skip
    sig, attrs = _kv4_signature(fn, pointers, consts)
    src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    options = {"num_warps": warps, "num_stages": stages}
    if max_registers:
        options["maxnreg"] = max_registers
    return triton.compile(src, target=TARGET, options=options)


def compile_wgmma_variant(
    bm: int, bn: int, bk: int, warps: int, stages: int, dtype: str = "fp16", split: int = 1,
    bias: bool = False, group: int = 128, ws: bool = False, maxnreg: int = 0,
    pairs: bool | None = None, w4a8: bool = False, pipe: bool = False,
):  # fmt: skip
    """The W4A16 Gluon wgmma_rs kernel (`ws`: with its TMA producer warp; `maxnreg`: ptxas's
    cap per thread; `pairs`: `PAIRS`, by default as `launch` sets it; `w4a8`: its int8 mode;
    `pipe`: `PIPE`, each tile's wgmma left in flight past its step) for sm_90. Gluon kernels
    compile through `warmup`, which asks the active driver for the target: a stand-in driver
    names sm_90 on a machine without a GPU, and TMA descriptors over CPU tensors give the
    argument types."""
    import torch
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    from qcompile.lowering import w4a16_wgmma
    from qcompile.lowering.autotune import KernelConfig
    from qcompile.lowering.w4a16 import _wgmma_sub

    class _Sm90:
        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_active_torch_device(self):
            return torch.device("cpu")

    tdt = torch.float16 if dtype == "fp16" else torch.bfloat16
    m, n, k = 256, 512, 1024
    x = torch.empty(m, k, dtype=torch.int8 if w4a8 else tdt)
    qw = torch.empty(k // 8, n, dtype=torch.int32)
    sc = torch.empty(k // group, n, dtype=torch.uint8 if w4a8 else tdt)
    x_layout, flat32, flat16 = w4a16_wgmma._layouts(bm, bk, x.dtype)  # (as the launcher)
    x_desc = TensorDescriptor(x, [m, k], [k, 1], [bm, bk], x_layout)
    w_desc = TensorDescriptor(qw, [k // 8, n], [n, 1], [bk // 8, bn], flat32)
    sub = _wgmma_sub(KernelConfig("wgmma_rs", bm, bn, bk), group)  # (as the launcher)
    s_desc = TensorDescriptor(sc, [k // group, n], [n, 1], [sub, bn], flat16)
    before = triton.runtime.driver._active  # (reset_active would look for a real driver)
    triton.runtime.driver.set_active(_Sm90())
    try:
        partials = torch.empty(split, m, n, dtype=torch.int32 if w4a8 else torch.float32)
        out = torch.empty(m, n, dtype=tdt)
        scale = torch.empty(max(m, n), dtype=torch.float32)
        extra = dict(W4A8=True, xs_ptr=scale, s1_ptr=scale) if w4a8 else {}
        return w4a16_wgmma._w4a16_wgmma_rs_kernel.warmup(
            x_desc, w_desc, s_desc, s_desc, out[0], out, partials, m, n, k, GROUP=group,
            HAS_BIAS=bias, SPLIT=split, STAGES=stages, num_warps=warps, WS=ws,
            PAIRS=w4a16_wgmma._pairs(KernelConfig("wgmma_rs", bm, bn, bk), w4a8)
            if pairs is None
            else pairs,
            grid=(1,), PIPE=pipe, **extra,
            **({"maxnreg": maxnreg} if maxnreg else {}),
        )  # fmt: skip
    finally:
        triton.runtime.driver._active = before


_SASS_LINE = re.compile(r"/\*([0-9a-f]+)\*/\s+(@!?U?P\w+\s+)?([A-Z][\w.]*)\s*(.*?)\s*;")
_LABEL = re.compile(r"^(\.L_x_\d+):")
_NO_DEST = ("ST", "BAR", "BRA", "HGMMA", "IGMMA", "WARPGROUP", "SYNCS", "RED", "ATOM", "UTMA", "FENCE",
            "MEMBAR", "EXIT", "RET", "CALL", "NOP", "DEPBAR", "ELECT", "WARPSYNC", "YIELD")  # fmt: skip


def _dest_registers(opcode: str, operands: str) -> set[int]:
    """The general registers an instruction writes (first operand; .64 / .128 widen it)."""
    if opcode.startswith(_NO_DEST) or opcode.startswith("U"):
        return set()
    first = operands.split(",")[0].strip()
    m = re.fullmatch(r"R(\d+)", first)
    if not m:
        return set()
    width = 4 if ".128" in opcode else 2 if (".64" in opcode or ".WIDE" in opcode) else 1
    return set(range(int(m.group(1)), int(m.group(1)) + width))


def wgmma_register_hazards(text: str) -> list[str]:
    """Writes to a register-A wgmma's operand registers before a wait that covers it.

    wgmma reads its register operand asynchronously: until a `WARPGROUP.DEPBAR.LE gsb0, 0xN`
    that retires its group (N or more groups committed after it) nothing may write those
    registers. For each loop that holds HGMMAs (IGMMAs), from each group's last one the loop
    body is followed in address order, around the back edge, to the first wait that retires
    it. (A wait for one outstanding group once let ptxas load the next tile's words into the
    in-flight operand: NaNs on the H100.) Returns one line per hazard."""
    rows = []  # (address, opcode, operands) or label
    for line in text.splitlines():
        lab = _LABEL.match(line.strip())
        if lab:
            rows.append(("label", lab.group(1), ""))
            continue
        m = _SASS_LINE.search(line)
        if m:
            rows.append((int(m.group(1), 16), m.group(3), m.group(4)))
    labels = {r[1]: i for i, r in enumerate(rows) if r[0] == "label"}
    hazards = []
    for end, row in enumerate(rows):
        if row[0] == "label" or not row[1].startswith("BRA"):
            continue
        target = re.search(r"\((\.L_x_\d+)\)", row[2])
        start = labels.get(target.group(1)) if target else None
        if start is None or start > end:
            continue  # not a backward branch
        body = [r for r in rows[start + 1 : end + 1] if r[0] != "label"]
        group: set[int] = set()
        for i, (addr, op, args) in enumerate(body):
            if not op.startswith(("HGMMA", "IGMMA")):
                continue
            a = re.match(r"\s*R\d+\s*,\s*R(\d+)", args)
            if a:
                group |= set(range(int(a.group(1)), int(a.group(1)) + 4))
            if "gsb0" not in args or not group:
                continue
            later = 0  # groups committed after this one
            for step in range(1, len(body)):  # around the loop from this group's last HGMMA
                _, op2, args2 = body[(i + step) % len(body)]
                if op2.startswith(("HGMMA", "IGMMA")) and "gsb0" in args2:
                    later += 1
                wait = re.search(r"gsb0\s*,\s*0x([0-9a-f]+)", args2)
                if op2.startswith("WARPGROUP.DEPBAR") and wait and int(wait.group(1), 16) <= later:
                    break
                hit = _dest_registers(op2, args2) & group
                if hit:
                    hazards.append(f"{op2} {args2} writes R{min(hit)} of the HGMMA at {addr:#x}")
            group = set()
    return hazards


def _tool(name: str, kernel, *args: str) -> str:
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        return subprocess.run(
            [path, *args, f.name], capture_output=True, text=True, check=True
        ).stdout


def sass(kernel) -> str:
    return _tool("nvdisasm", kernel, "-c")


def resources(kernel) -> dict[str, int]:
    """REG, STACK, SHARED, LOCAL from cuobjdump's resource usage line."""
    text = _tool("cuobjdump", kernel, "-res-usage")
    return {k: int(v) for k, v in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", text)}


def main_loop(text: str) -> list[str]:
    """Instructions of the largest backward-branching block with tensor-core instructions (the
    K loop; a kernel without them: the largest such block). The KV4 decode kernel's split
    combine is a loop too, at times longer than the main one."""
    lines = text.splitlines()
    labels = {
        m.group(1): i for i, line in enumerate(lines) if (m := re.match(r"^\s*\.?(L_x_\d+):", line))
    }
    best: list[str] = []
    for i, line in enumerate(lines):
        m = re.search(r"\bBRA\b.*`\(\.(L_x_\d+)\)", line)
        if m and m.group(1) in labels and labels[m.group(1)] < i:
            body = [
                ln
                for ln in lines[labels[m.group(1)] : i + 1]
                if re.search(r"/\*[0-9a-f]{4}\*/", ln)
            ]
            if _rank(body) > _rank(best):
                best = body
    return best


def ptx_k_loop(ptx: str) -> dict[str, int]:
    """The PTX K loop's steady-state path: of the backward branches whose body holds wgmmas,
    the one with the most TMA copies (a loop that issues copies on some iterations has a
    second back edge without them). Counts wgmmas, copies and CTA barriers in it."""
    lines = ptx.splitlines()
    labels = {
        m.group(1): i for i, ln in enumerate(lines) if (m := re.match(r"^(\$L__BB\d+_\d+):", ln))
    }
    best = {"wgmma": 0, "tma": -1, "bar": 0}
    for i, line in enumerate(lines):
        m = re.search(r"\bbra(?:\.uni)?\s+(\$L__BB\d+_\d+);", line)
        if not (m and m.group(1) in labels and labels[m.group(1)] < i):
            continue
        body = "\n".join(lines[labels[m.group(1)] : i + 1])
        row = {
            "wgmma": body.count("wgmma.mma_async"),
            "tma": body.count("cp.async.bulk.tensor"),
            "bar": body.count("bar.sync"),
        }
        if row["wgmma"] and row["tma"] > best["tma"]:
            best = row
    return best


def _rank(body: list[str]) -> tuple[bool, int]:
    return any(opcode(ln).endswith("MMA") for ln in body), len(body)  # HMMA, IMMA, HGMMA, ...


def opcode(line: str) -> str:
    m = re.search(r"\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", line)
    return m.group(1) if m else "?"


def report(
    kind: str, bm: int, bn: int, bk: int, warps: int, stages: int, prefetch: int = 0,
    family: str = "w4a16",
) -> dict:  # fmt: skip
    """`family` "w4a8" / "w4a8_fp8" compiles the W4A8 kernels (`prefetch` unused there)."""
    if family == "w4a16":
        k = compile_variant(kind, bm, bn, bk, warps, stages, prefetch)
    else:
        k = compile_w4a8_variant(
            kind, bm, bn, bk, warps, stages, fp8=family == "w4a8_fp8", prefetch=prefetch
        )
    res = resources(k)
    loop = main_loop(sass(k))
    counts = collections.Counter(opcode(line) for line in loop)
    weights_per_thread = bn * bk / (warps * 32)
    # Tensor-core kernels: clocks one K iteration needs to issue (4 warp schedulers per SM)
    # vs to run its MMAs (H100 SXM dense per SM per clock: ~4270 int8/fp8 MACs, ~2135 fp16).
    issue_clk = len(loop) * warps / 4
    mma_clk = bm * bn * bk / (2135 if family == "w4a16" else 4270) if kind != "gemv" else 0.0
    return {
        "variant": f"{family} {kind} BM{bm} BN{bn} BK{bk} w{warps} s{stages}"
        f"{f' pf{int(prefetch)}' if prefetch else ''}",
        "regs": res.get("REG", -1), "spills": res.get("LOCAL", 0) + res.get("STACK", 0),
        "smem": k.metadata.shared,
        "loop_instr": len(loop), "instr_per_weight": len(loop) / weights_per_thread,
        "issue_over_mma": issue_clk / mma_clk if mma_clk else float("nan"),
        "top": ", ".join(f"{op}:{c}" for op, c in counts.most_common(8)),
    }  # fmt: skip


VARIANTS = [
    ("mma", 16, 128, 128, 4, 1), ("mma", 32, 128, 128, 4, 1), ("mma", 64, 128, 128, 4, 1),
    ("mma", 16, 128, 128, 4, 1, True), ("mma", 32, 128, 128, 4, 1, True),
    ("mma", 64, 128, 64, 4, 1, True), ("mma", 16, 128, 64, 4, 1, True),
    ("mma", 16, 128, 128, 4, 1, 2), ("mma", 32, 128, 128, 4, 1, 2), ("mma", 64, 128, 64, 4, 1, 2),
    ("gemv", 1, 128, 64, 1, 1), ("gemv", 1, 512, 64, 4, 1), ("gemv", 1, 256, 128, 4, 1),
    ("gemv", 1, 256, 64, 2, 1, True), ("gemm_planes", 16, 128, 128, 4, 2, True),
    ("gemm_planes", 64, 128, 128, 4, 2), ("gemm_planes_direct", 64, 128, 128, 4, 2),
    ("gemm_planes_direct", 64, 128, 256, 8, 2),
    ("gemm", 16, 64, 128, 4, 3), ("gemm_swap", 16, 64, 128, 4, 3), ("gemm_planes", 16, 128, 128, 4, 2),
    ("gemm_planes_xreg", 16, 128, 128, 4, 2), ("gemm_planes_xreg", 16, 64, 128, 4, 2),
    ("gemm_planes", 16, 256, 128, 8, 2), ("gemm", 64, 128, 64, 4, 3),
    ("gemm_swap", 64, 128, 64, 4, 3), ("gemm", 128, 128, 64, 8, 3), ("gemm_swap", 128, 128, 64, 8, 3),
    ("gemv", 1, 512, 64, 4, 1, False, "w4a8"), ("gemv", 1, 256, 128, 2, 1, False, "w4a8"),
    ("gemm_planes", 16, 128, 256, 4, 2, False, "w4a8"), ("gemm", 16, 64, 128, 4, 3, False, "w4a8"),
    ("gemm", 64, 128, 64, 4, 3, False, "w4a8"), ("gemm", 128, 128, 64, 4, 3, False, "w4a8"),
    ("gemm", 256, 128, 64, 8, 3, False, "w4a8"), ("gemm", 256, 128, 128, 8, 2, False, "w4a8"),
    ("gemm_swar", 256, 64, 128, 4, 3, False, "w4a8"), ("gemm_swar", 128, 64, 128, 4, 3, False, "w4a8"),
    ("gemv", 1, 512, 64, 4, 1, False, "w4a8_fp8"), ("gemm", 64, 128, 64, 4, 3, False, "w4a8_fp8"),
    ("gemm", 128, 128, 128, 8, 3, False, "w4a8_fp8"),
]  # fmt: skip


if __name__ == "__main__":
    print(f"triton {triton.__version__}, target sm_90")
    print(
        f"{'variant':46s} {'regs':>4s} {'spill':>5s} {'smem':>6s} {'loop':>5s} {'i/w':>6s}"
        f" {'iss/mma':>7s}  top opcodes"
    )
    for v in VARIANTS:
        r = report(*v)
        print(
            f"{r['variant']:46s} {r['regs']:4d} {r['spills']:5d} {r['smem']:6d} {r['loop_instr']:5d}"
            f" {r['instr_per_weight']:6.2f} {r['issue_over_mma']:7.2f}  {r['top']}"
        )
