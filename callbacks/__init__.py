"""stagewise: callbacks."""

from callbacks.hparams_metrics import FinalMetricsToHparams  # noqa: F401
from callbacks.forgetting import ForgettingMonitor  # noqa: F401
from callbacks.l2sp import L2SP  # noqa: F401
