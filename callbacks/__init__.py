"""stagewise: callbacks."""

from callbacks.hparams_metrics import FinalMetricsToHparams  # noqa: F401
