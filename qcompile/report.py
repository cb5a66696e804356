"""What the backend (or `quantize_`) did to each linear layer and attention, and why."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Literal

log = logging.getLogger("qcompile")

Status = Literal["quantized", "prequantized", "skipped", "fallback"]


@dataclass(frozen=True)
class LayerRecord:
    """One linear layer: its name, [N, K] shape, what happened and why."""

    name: str
    shape: tuple[int, int]
    status: Status
    detail: str  # the scheme for quantized layers, the reason otherwise
    path: str = ""  # "triton" or "reference" for quantized layers
    # Where the op's activation prologue (`prologue`: W4A8's per-token quantization, W4A16's
    # plane-major x) goes: "fused into ..." (its producer) / "not fused: ..." ('' when none).
    fusion: str = ""
    # Sibling fusion (passes/fuse.py): the layers sharing this layer's launch, and its N.
    fused_with: tuple[str, ...] = ()
    fused_n: int = 0
    prologue: str = "activation quantization"

    @property
    def fused_note(self) -> str:
        """e.g. `fused with k_proj, v_proj: one launch of N=6144` ('' when not fused); sibling
        names are shortened to the part after this layer's parent path."""
        if not self.fused_with:
            return ""
        parent = self.name.rpartition(".")[0]
        short = [
            n[len(parent) + 1 :] if parent and n.startswith(parent + ".") else n
            for n in self.fused_with
        ]
        return f"fused with {', '.join(short)}: one launch of N={self.fused_n}"


@dataclass(frozen=True)
class AttentionRecord:
    """One attention node (SDPA or the eager matmul-softmax-matmul form) and what happened.

    status: "quantized" (rewritten into `qcompile::kv4_attention`), "prequantized" (the graph
    already calls it: transformers' "qcompile_kv4" attention function), "skipped" (no KV4
    cache feeds it: left as it was) or "fallback" (a KV4 cache feeds it but the rewrite's
    preconditions fail: it keeps reading the dequantized cache).
    """

    name: str
    form: str  # "sdpa", "eager" or "kv4"
    heads: tuple[int, int]  # (query heads, KV heads); 0 where unknown
    head_dim: int
    status: Status
    detail: str
    path: str = ""


@dataclass
class CompileReport:
    """Records of every linear node in every graph a backend compiled (or a `quantize_` call),
    and of every attention node the attention pass looked at (`attention`)."""

    records: list[LayerRecord] = field(default_factory=list)
    graphs: int = 0
    attention: list[AttentionRecord] = field(default_factory=list)
    pass_seconds: float = 0.0  # wall time in the qcompile passes (not Inductor), all graphs

    def add(self, record: LayerRecord | AttentionRecord) -> None:
        (self.attention if isinstance(record, AttentionRecord) else self.records).append(record)

    def by_status(self, status: Status) -> list[LayerRecord]:
        return [r for r in self.records if r.status == status]

    def summary(self) -> str:
        where = f" in {self.graphs} graph(s)" if self.graphs else ""
        text = f"qcompile: {len(self.records)} linear layers{where}: " + _counts(self.records)
        prologues: dict[str, list[LayerRecord]] = {}
        for r in self.records:
            if r.fusion:
                prologues.setdefault(r.prologue, []).append(r)
        for prologue, with_act in prologues.items():
            fused = sum(r.fusion.startswith("fused") for r in with_act)
            text += f"; {prologue} fused into its producer for {fused}/{len(with_act)}"
        siblings = [r for r in self.records if r.fused_with]
        if siblings:
            launches = round(sum(1 / (len(r.fused_with) + 1) for r in siblings))
            text += f"; {len(siblings)} sibling layers fused into {launches} launches"
        if self.attention:
            text += f"; {len(self.attention)} attention: " + _counts(self.attention)
        return text

    def latest_per_layer(self) -> CompileReport:
        """The report with one record per layer and attention node: the latest graph's (a
        model compiled for prefill and decode, or for several shapes, lists each once)."""
        records = {r.name: r for r in self.records}
        attention = {r.name: r for r in self.attention}
        return CompileReport(
            list(records.values()), self.graphs, list(attention.values()), self.pass_seconds
        )

    def table(self) -> str:
        """A fixed-width table, one row per layer, for printing."""
        rows = [("layer", "N x K", "status", "path", "detail")]
        rows += [
            (r.name, f"{r.shape[0]} x {r.shape[1]}", r.status, r.path, _detail(r))
            for r in self.records
        ]
        lines = _aligned(rows)
        if self.attention:
            rows = [("attention", "Hq/Hkv x D", "status", "path", "detail")]
            rows += [
                (r.name, f"{r.heads[0]}/{r.heads[1]} x {r.head_dim}", r.status, r.path,
                 f"{r.form}: {r.detail}")
                for r in self.attention
            ]  # fmt: skip
            lines += ["", *_aligned(rows)]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary() + "\n" + self.table()

    def log(self) -> None:
        """One summary line; fallbacks as a warning, since they cost speed and memory."""
        fallbacks = self.by_status("fallback") + [
            r for r in self.attention if r.status == "fallback"
        ]
        if fallbacks:
            reasons = "; ".join(f"{r.name}: {r.detail}" for r in fallbacks[:5])
            more = f" (+{len(fallbacks) - 5} more)" if len(fallbacks) > 5 else ""
            log.warning("%s. Fallbacks: %s%s", self.summary(), reasons, more)
        else:
            log.info(self.summary())


def _detail(r: LayerRecord) -> str:
    text = f"{r.detail}; {r.prologue} {r.fusion}" if r.fusion else r.detail
    return f"{text}; {r.fused_note}" if r.fused_with else text


def _counts(records: list) -> str:
    counts = Counter(r.status for r in records)
    parts = [
        f"{counts[s]} {s}"
        for s in ("quantized", "prequantized", "skipped", "fallback")
        if counts[s]
    ]
    return ", ".join(parts) or "none matched"


def _aligned(rows: list[tuple[str, ...]]) -> list[str]:
    """Rows of 5 columns, the first 4 padded to a common width."""
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    return [
        "  ".join(c.ljust(w) for c, w in zip(row[:4], widths, strict=True)) + "  " + row[4]
        for row in rows
    ]
