"""Streaming metrics of a model against labels and against its FP parent, kept as exact sums and counts.

- top-1 / top-5 accuracy (labelled data);
- agreement: fraction of images where the quantized top-1 equals the FP top-1;
- KL(FP ‖ Q): mean over images of Σ_c p_fp·(log p_fp − log p_q) on the softmax;
- logit SQNR: 10·log10(Σ z_fp² / Σ (z_fp − z_q)²) in dB over all logits.
Sums rather than averages, so that shards (batches, processes) combine exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F


@dataclass
class MetricSums:
    images: int = 0
    labelled: int = 0
    top1: int = 0
    top5: int = 0
    compared: int = 0
    agree: int = 0
    kl: float = 0.0
    signal: float = 0.0
    noise: float = 0.0

    @torch.no_grad()
    def update(self, logits: torch.Tensor, labels: torch.Tensor | None = None, fp_logits: torch.Tensor | None = None):
        logits = logits.float()
        self.images += logits.shape[0]
        if labels is not None and (labels >= 0).any():
            mask = labels >= 0
            k = min(5, logits.shape[1])
            topk = logits[mask].topk(k, dim=1).indices
            hits = topk == labels[mask].unsqueeze(1)
            self.labelled += int(mask.sum())
            self.top1 += int(hits[:, 0].sum())
            self.top5 += int(hits.any(dim=1).sum())
        if fp_logits is not None:
            fp_logits = fp_logits.float()
            self.compared += logits.shape[0]
            self.agree += int((logits.argmax(1) == fp_logits.argmax(1)).sum())
            log_p, log_q = F.log_softmax(fp_logits.double(), 1), F.log_softmax(logits.double(), 1)
            self.kl += float((log_p.exp() * (log_p - log_q)).sum())
            self.signal += float(fp_logits.double().pow(2).sum())
            self.noise += float((fp_logits.double() - logits.double()).pow(2).sum())

    def merge(self, other: MetricSums) -> MetricSums:
        return MetricSums(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)})

    def summary(self) -> dict[str, float | None]:
        """top1/top5/agreement in percent, KL in nats per image, SQNR in dB; None where not applicable."""

        def pct(a, n):
            return 100.0 * a / n if n else None

        sqnr = None
        if self.compared:
            sqnr = math.inf if self.noise == 0 else 10 * math.log10(self.signal / self.noise)
        return {
            "top1": pct(self.top1, self.labelled),
            "top5": pct(self.top5, self.labelled),
            "agreement": pct(self.agree, self.compared),
            "kl": self.kl / self.compared if self.compared else None,
            "sqnr_db": sqnr,
        }
