"""stagewise: callbacks."""

from callbacks.best_checkpoint import BestCheckpoint  # noqa: F401
from callbacks.hparams_metrics import FinalMetricsToHparams  # noqa: F401
from callbacks.forgetting import ForgettingMonitor  # noqa: F401
from callbacks.l2sp import L2SP  # noqa: F401
from callbacks.stability_gap import StabilityGap  # noqa: F401
from callbacks.stage_handoff import StageHandoff  # noqa: F401
from callbacks.text_samples import TextSamples  # noqa: F401
from callbacks.tool_call_eval import ToolCallEval  # noqa: F401
from callbacks.precision import Float8MixedPrecision, MixedPrecisionMonitor  # noqa: F401
from callbacks.throughput import Throughput  # noqa: F401
from callbacks.safety import AtomicCheckpointIO, LastCheckpoint, PreemptionCheck  # noqa: F401
