"""What the backend (or `quantize_`) did to each linear layer, and why."""

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
    # W4A8: where the per-token activation quantization goes ("fused into ..." / "not fused: ...")
    fusion: str = ""


@dataclass
class CompileReport:
    """Records of every linear node in every graph a backend compiled (or a `quantize_` call)."""

    records: list[LayerRecord] = field(default_factory=list)
    graphs: int = 0

    def add(self, record: LayerRecord) -> None:
        self.records.append(record)

    def by_status(self, status: Status) -> list[LayerRecord]:
        return [r for r in self.records if r.status == status]

    def summary(self) -> str:
        counts = Counter(r.status for r in self.records)
        parts = [
            f"{counts[s]} {s}"
            for s in ("quantized", "prequantized", "skipped", "fallback")
            if counts[s]
        ]
        where = f" in {self.graphs} graph(s)" if self.graphs else ""
        line = f"qcompile: {len(self.records)} linear layers{where}: " + (
            ", ".join(parts) or "none matched"
        )
        with_act = [r for r in self.records if r.fusion]
        if with_act:
            fused = sum(r.fusion.startswith("fused") for r in with_act)
            line += f"; activation quantization fused into its producer for {fused}/{len(with_act)}"
        return line

    def table(self) -> str:
        """A fixed-width table, one row per layer, for printing."""
        rows = [("layer", "N x K", "status", "path", "detail")]
        rows += [
            (
                r.name,
                f"{r.shape[0]} x {r.shape[1]}",
                r.status,
                r.path,
                f"{r.detail}; activation quantization {r.fusion}" if r.fusion else r.detail,
            )
            for r in self.records
        ]
        widths = [max(len(row[i]) for row in rows) for i in range(4)]
        lines = [
            "  ".join(c.ljust(w) for c, w in zip(row[:4], widths, strict=True)) + "  " + row[4]
            for row in rows
        ]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary() + "\n" + self.table()

    def log(self) -> None:
        """One summary line; fallbacks as a warning, since they cost speed and memory."""
        fallbacks = self.by_status("fallback")
        if fallbacks:
            reasons = "; ".join(f"{r.name}: {r.detail}" for r in fallbacks[:5])
            more = f" (+{len(fallbacks) - 5} more)" if len(fallbacks) > 5 else ""
            log.warning("%s. Fallbacks: %s%s", self.summary(), reasons, more)
        else:
            log.info(self.summary())
