"""Classification metrics from logits: top-1/top-5, macro precision/recall/F1, teacher agreement."""
from __future__ import annotations

import torch


def classification_metrics(
    logits: torch.Tensor, labels: torch.Tensor, teacher_pred: torch.Tensor | None = None
) -> dict[str, float]:
    """Metrics in percent. Macro averages are over the classes present in ``labels``.

    ``agreement`` is the share of images where the prediction equals ``teacher_pred``.
    """
    num_classes = logits.shape[1]
    pred = logits.argmax(1)
    k = min(5, num_classes)
    top5 = (logits.topk(k, dim=1).indices == labels[:, None]).any(1)
    cm = torch.bincount(labels * num_classes + pred, minlength=num_classes**2).reshape(num_classes, num_classes)
    cm = cm.double()
    tp = cm.diag()
    support = cm.sum(1)  # true counts per class
    predicted = cm.sum(0)
    present = support > 0
    precision = torch.where(predicted > 0, tp / predicted.clamp(min=1), torch.zeros_like(tp))
    recall = tp / support.clamp(min=1)
    f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall).clamp(min=1e-12), torch.zeros_like(tp))
    out = {
        "top1": 100.0 * (pred == labels).double().mean().item(),
        "top5": 100.0 * top5.double().mean().item(),
        "precision": 100.0 * precision[present].mean().item(),
        "recall": 100.0 * recall[present].mean().item(),
        "f1": 100.0 * f1[present].mean().item(),
    }
    if teacher_pred is not None:
        out["agreement"] = 100.0 * (pred == teacher_pred).double().mean().item()
    return out
