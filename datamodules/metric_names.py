"""Every metric name stagewise logs or reads, built and parsed here only.

Names with a domain put it in the middle (``val/<domain>/loss``): TensorBoard groups a panel per prefix,
and a domain never compares with another. Everything that writes or reads a metric (the module, the
callbacks, the report, the notebook's loader, the studies) goes through these functions.
"""

from __future__ import annotations

import math
import re
from typing import Any, Mapping

TRAIN_LOSS = "train/loss"
TRAIN_TOKENS = "train/tokens"
TRAIN_LR = "train/lr"
TRAIN_GRAD_NORM = "train/grad_norm"
TRAIN_SKIPPED_STEPS = "train/skipped_steps"
TRAIN_TOKENS_LOSS = "train_tokens/loss"  # against the lineage's total tokens
STAGE_BOUNDARY = "stage/boundary"
FORGETTING_ALARMS = "forgetting/alarms"  # text
VAL_PREFIX = "val/"
_VAL_METRIC = re.compile(r"^(val|val_tokens)/([^/]+)/([^/]+)$")


def val_loss(domain: str) -> str:
    """Held-out loss of ``domain`` by optimizer step: ``val/<domain>/loss``."""
    return f"val/{domain}/loss"


def val_ppl(domain: str) -> str:
    """Held-out perplexity of ``domain``: ``val/<domain>/ppl``."""
    return f"val/{domain}/ppl"


def test_metric(name: str) -> str:
    """The name of a held-out metric measured on the test split instead of the val split (``stagewise test``):
    ``val/<domain>/loss`` -> ``test/<domain>/loss``, ``tools/seen/call_accuracy`` -> ``test/tools/seen/call_accuracy``."""
    return "test/" + name.removeprefix(VAL_PREFIX)


def val_tokens_loss(domain: str) -> str:
    """Held-out loss of ``domain`` against the lineage's total tokens: ``val_tokens/<domain>/loss``."""
    return f"val_tokens/{domain}/loss"


def domain_of_val_loss(name: str, axis: str = "val", metric: str | None = "loss") -> str | None:
    """``val/<domain>/loss`` -> ``<domain>`` (``axis="val_tokens"``: ``val_tokens/<domain>/loss``; ``metric=None``:
    any ``val/<domain>/<what>``); None for any other name."""
    match = _VAL_METRIC.match(name)
    if not match or match.group(1) != axis or (metric is not None and match.group(3) != metric):
        return None
    return match.group(2)


def val_losses(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Every finite ``val/<domain>/loss`` of ``metrics`` (e.g. ``trainer.callback_metrics``), by domain."""
    out = {}
    for name, value in metrics.items():
        domain = domain_of_val_loss(name)
        if domain is None or (hasattr(value, "numel") and value.numel() != 1):
            continue
        if math.isfinite(float(value)):
            out[domain] = float(value)
    return out


def stability_loss(domain: str) -> str:
    """Held-out loss of ``domain`` measured densely early in a stage (``callbacks.StabilityGap``), by optimizer
    step: ``stability/<domain>/loss``."""
    return f"stability/{domain}/loss"


def stability_tokens_loss(domain: str) -> str:
    """The same against the lineage's total tokens: ``stability_tokens/<domain>/loss``."""
    return f"stability_tokens/{domain}/loss"


def forgetting(domain: str) -> str:
    """Relative rise of an earlier domain's held-out loss over its baseline: ``forgetting/<domain>``."""
    return f"forgetting/{domain}"


def forgetting_max_rise(domain: str) -> str:
    """The largest rise so far: ``forgetting/<domain>/max_rise``."""
    return f"forgetting/{domain}/max_rise"


def forgetting_vs_tokens(name: str) -> str:
    """A ``forgetting/...`` metric against total tokens: ``forgetting_vs_tokens/...``."""
    return name.replace("forgetting/", "forgetting_vs_tokens/", 1)


def tool_score(score: str, split: str | None = None) -> str:
    """A tool-call score: ``tools/<score>``, or ``tools/<split>/<score>`` for a subset of the examples
    (e.g. services seen or unseen in training)."""
    return f"tools/{score}" if split is None else f"tools/{split}/{score}"


def tool_samples(split: str | None = None) -> str:
    """The text tab of generated tool calls: ``tools/samples``, or ``tools/<split>/samples``."""
    return tool_score("samples", split)
