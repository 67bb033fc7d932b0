"""The training loop: a frozen model, one trainable adapter, data in, an adapter folder and metrics out.

One optimizer step, with ``G`` = ``grad_accum`` micro-batches and N = the loss items (response tokens, or examples
for classification) over all of them:

    loss  = (1/N) * sum_{g=1..G} sum_{items i in g} l_i          (token-weighted, not a mean of micro-batch means)
    g     = clip(grad loss, max_grad_norm)
    theta = AdamW(theta, g, lr(step))                              (trainable parameters only)
    lr(s) = peak * (s+1)/W for s < W, then cosine (or linear) decay from peak to 0 at the last step

Where the speed comes from: causal-LM batches are packed (the micro-batch's examples concatenated in one row, no
padding) and attention runs causally *within* each packed sequence (:func:`.attention.packed_attention`, sum L_i^2
work instead of (sum L_i)^2 for a masked row); the vocabulary head runs only where the loss counts
(``causal_lm_loss``).

Nothing is lost: every ``save_every`` steps a checkpoint (trainable parameters, AdamW state, RNG states, step) is
written atomically, safetensors for tensors and JSON for the rest (never pickle); ``resume`` continues from the
newest readable one and ends with the same adapter as an uninterrupted run. Ctrl-C (or SIGTERM) saves a checkpoint
and stops; a non-finite loss stops without saving, keeping the last good checkpoint.

Modules, each depending only on those above it:

    config       methods, TrainConfig, learning-rate schedule
    task_data    examples from a data path: task, held-out split, tokenization, batch order
    attention    packed attention (per-sequence causal attention in a packed row)
    tasks        loss and evaluation for causal LM and classification
    model        base model and the method's adapter config
    run_folder   checkpoints, metrics.jsonl, samples, summary
    generation   greedy generation
    loop         TrainingRun, train, resume
    evaluation   find / evaluate a trained adapter
"""

from .config import TrainConfig, learning_rate
from .evaluation import adapter_task, evaluate_adapter, find_adapter
from .generation import generate_texts
from .loop import NonFiniteLossError, TrainingInterrupted, TrainingRun, resume, train
from .run_folder import (
    METRICS_FILE,
    TrainResult,
    list_checkpoints,
    load_checkpoint,
    read_metrics,
    save_checkpoint,
    summary_table,
    trainable_parameters,
)
from .task_data import infer_task, split_holdout
from .tasks import ClassificationTask, LMTask, classification_metrics

__all__ = [
    "train", "resume", "TrainingRun", "TrainResult", "TrainingInterrupted", "NonFiniteLossError",
    "TrainConfig", "learning_rate", "infer_task", "split_holdout",
    "LMTask", "ClassificationTask", "classification_metrics",
    "METRICS_FILE", "list_checkpoints", "save_checkpoint", "load_checkpoint", "trainable_parameters",
    "read_metrics", "summary_table",
    "evaluate_adapter", "find_adapter", "adapter_task", "generate_texts",
]
