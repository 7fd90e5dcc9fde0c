"""Decoding, in one place: greedy generation with a KV cache (on a GPU each token's step replayed as one CUDA
graph), batched greedy continuations of many prompts, and the module to decode with during a fit (an
unsharded copy under FSDP).

``CausalLM.generate`` is :func:`generate`; the callbacks that decode during training (``TextSamples``,
``ToolCallEval``), ``stagewise evaluate`` and the tool-call scorer all go through
:func:`greedy_continuations`.
"""

from __future__ import annotations

import inspect
import os
import warnings
from contextlib import contextmanager

import torch
import torch.nn as nn

from datamodules.errors import StagewiseError


def next_token(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """The next token of each row of ``logits`` [B, V]: the argmax when ``temperature`` is 0, else a draw from
    ``softmax(logits / temperature)`` restricted to the ``top_k`` largest logits (all when None)."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    module, input_ids: torch.Tensor, max_new_tokens: int, eos_token_id: int | list[int] | None = None,
    attention_mask: torch.Tensor | None = None, pad_token_id: int | None = None,
    temperature: float = 0.0, top_k: int | None = None, generator: torch.Generator | None = None,
    static: bool | None = None, logits_processor=None,
) -> torch.Tensor:
    """Greedy (or sampled) continuation of prompts ``input_ids`` [B, T] by ``module`` (a ``CausalLM``), all
    rows decoded together with a KV cache.

    Args:
        module: A ``CausalLM`` (or subclass): its ``model`` is built if needed and decodes.
        input_ids: Prompts [B, T]; prompts of different lengths are left-padded.
        max_new_tokens: Most tokens generated per row.
        eos_token_id: Stop id(s): a row stops after emitting any of them; generation ends once all rows
            have stopped.
        attention_mask: [B, T], 1 for prompt tokens and 0 for left padding (None: no padding).
        pad_token_id: Fills a stopped row's later slots (default: the first stop id).
        temperature: 0 decodes greedily; above 0, each token is sampled from ``softmax(logits / temperature)``.
        top_k: When sampling, only from the ``top_k`` most likely tokens (all when None).
        generator: The random generator sampling draws from (default: torch's global one).
        static: Decode each token with ``Transformer.decode_step`` (static shapes), replayed as a CUDA graph on a
            GPU (``STAGEWISE_CUDA_GRAPHS=0`` replays none); default: on a GPU. Off: each token through
            ``forward`` with a growing cache. Same tokens either way, up to float rounding.
        logits_processor: Called before each token is chosen as ``logits_processor(ids, scores)`` with every
            token so far [B, T] and the next token's logits [B, V]; returns the logits to choose from
            (transformers' ``LogitsProcessor`` signature; e.g. ``tool_constraint.ToolCallConstraint``).

    Returns:
        Prompt + new tokens [B, T + n]; greedily, row ``b`` equals its own unbatched continuation.
    """
    module.configure_model()
    model = module.model
    input_ids = input_ids.to(module.device)
    stops = torch.tensor([] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int)
                         else list(eos_token_id), dtype=torch.long, device=module.device)
    pad = pad_token_id if pad_token_id is not None else int(stops[0]) if len(stops) else 0
    if attention_mask is not None and bool(attention_mask.all()):
        attention_mask = None
    if attention_mask is not None and "key_mask" not in inspect.signature(model.layers[0].attn.attend).parameters:
        if logits_processor is not None:
            raise StagewiseError("a logits_processor needs the rows decoded together; this model's attention "
                                 f"({type(model.layers[0].attn).__name__}.attend) takes no key_mask for padded rows")
        # an attention subclass without padding support: decode the rows one by one, unpadded
        news = [generate(module, ids[mask.bool()][None], max_new_tokens, eos_token_id, None, pad, temperature, top_k,
                         generator)[0, int(mask.sum()):]
                for ids, mask in zip(input_ids, attention_mask.to(module.device))]
        return torch.cat([input_ids, nn.utils.rnn.pad_sequence(news, batch_first=True, padding_value=pad)], 1)
    was_training = module.training
    module.eval()
    cache = model.make_cache(input_ids.shape[0], input_ids.shape[1] + max_new_tokens)
    logits = model(input_ids, cache, attention_mask=attention_mask, last_only=True)
    if static is None:
        static = module.device.type == "cuda"
    graph = module.device.type == "cuda" and os.environ.get("STAGEWISE_CUDA_GRAPHS", "1") != "0"
    step = _steps(model, cache, graph) if static and model.static_decoding() else None
    out, done = [input_ids], torch.zeros(input_ids.shape[0], dtype=torch.bool, device=module.device)
    all_done = []
    for i in range(max_new_tokens):
        scores = logits[:, -1]
        if logits_processor is not None:
            scores = logits_processor(torch.cat(out, dim=1), scores)
        token = torch.where(done, pad, next_token(scores, temperature, top_k, generator))
        done = done | torch.isin(token, stops)
        out.append(token[:, None])
        all_done.append(done.all())
        # whether every row has stopped is asked every 8 tokens (each question waits for the device), and the
        # tokens past the step where they all had are cut below
        if i == max_new_tokens - 1 or (i % 8 == 7 and bool(all_done[-1])):
            break
        logits = step(token[:, None]) if step is not None else model(token[:, None], cache, last_only=True)
    module.train(was_training)
    ended = torch.stack(all_done)
    n = int(ended.int().argmax()) + 1 if bool(ended.any()) else len(all_done)
    return torch.cat(out[:1 + n], dim=1)


def _steps(model, cache, graph: bool):
    """The decoding step after a prefill: ``token [B, 1] -> logits [B, 1, V]`` through
    ``model.decode_step`` (static shapes), captured once as a CUDA graph and replayed when ``graph``.

    Eager decoding of a small model is bound by the host: about 2,300 PyTorch calls per token for the
    10-layer ``small`` preset, each a few microseconds, while the device work per token is a fraction of a
    millisecond. A replayed graph issues them all at once. When capture fails (an op that cannot be captured,
    a driver that refuses), the step runs eagerly, with a warning."""
    B = cache.layers[0].k.shape[0]
    device = cache.layers[0].k.device
    if cache.key_mask is None:  # an unpadded prefill: every written slot is real
        cache.key_mask = torch.zeros(B, cache.max_len, dtype=torch.bool, device=device)
        cache.key_mask[:, :cache.pos] = True
        cache.lengths = torch.full((B,), cache.pos, dtype=torch.long, device=device)
    slot = torch.tensor(cache.pos, dtype=torch.long, device=device)

    def eager(token: torch.Tensor) -> torch.Tensor:
        logits = model.decode_step(token, cache, slot)
        slot.add_(1)
        return logits

    if not graph:
        return eager
    try:
        return _graphed(model, cache, slot)
    except Exception as err:  # noqa: BLE001 - any capture failure leaves eager decoding, which is correct
        warnings.warn(f"decoding without a CUDA graph ({type(err).__name__}: {err}); expect it to be slower")
        return eager


captures = 0
"""CUDA graphs of the decoding step captured in this process (how ``experiments/benchmark_decoding.py`` knows that
its graph mode replayed a graph instead of decoding eagerly after a failed capture)."""


def _graphed(model, cache, slot: torch.Tensor):
    B, device = cache.layers[0].k.shape[0], cache.layers[0].k.device
    static_token = torch.zeros(B, 1, dtype=torch.long, device=device)
    # warming up runs the step for real: keep what it writes to the cache's bookkeeping and put it back, also
    # when capture fails (the keys and values it writes at `slot` are overwritten by the first real step)
    key_mask, lengths, at = cache.key_mask.clone(), cache.lengths.clone(), slot.clone()
    autocast, dtype = torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")
    try:
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(2):
                model.decode_step(static_token, cache, slot)
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # autocast's cast cache would hand the graph tensors freed after capture: cast inside it instead.
        # Capture errors are this thread's only: during a fit, a DataLoader's pin-memory thread keeps allocating.
        with torch.autocast("cuda", dtype=dtype, enabled=autocast, cache_enabled=False), \
                torch.cuda.graph(graph, capture_error_mode="thread_local"):
            static_logits = model.decode_step(static_token, cache, slot)
            slot.add_(1)
    finally:
        cache.key_mask.copy_(key_mask)
        cache.lengths.copy_(lengths)
        slot.copy_(at)
    global captures
    captures += 1

    def replay(token: torch.Tensor, keep=(slot, cache)) -> torch.Tensor:
        # `keep`: the graph reads and writes `slot` and the cache by address; freed, their memory would go to
        # the next tensors allocated (a `done` flag that the graph's `slot += 1` then turned on)
        static_token.copy_(token)
        graph.replay()
        return static_logits

    return replay


@torch.no_grad()
def greedy_continuations(model, prompts: list[list[int]], max_new_tokens: int, stop_ids: list[int],
                         batch_size: int | None = None, max_prompt_tokens: int | None = None,
                         logits_processor_for=None, temperature: float = 0.0,
                         generator: torch.Generator | None = None) -> list[list[int]]:
    """Greedy new tokens after each prompt, up to and including its first stop id, decoded in batches.

    Prompts of similar length are batched together (left-padded, KV cache, :func:`generate`);
    each result equals the prompt's unbatched greedy continuation. A prompt is cut from the left to at most
    ``max_prompt_tokens`` and to leave room for ``max_new_tokens`` in the model's context. ``batch_size``
    (prompts decoded together; the results do not depend on it) defaults to 64 on a GPU, 16 elsewhere.
    ``logits_processor_for(rows)``, given a batch's prompt indices in batch order, returns that batch's
    ``logits_processor`` (:func:`generate`). With ``temperature`` above 0 each token is sampled instead
    (:func:`next_token`, from ``generator``): the draws then depend on the batching, the tokens' law does not.
    """
    context = getattr(getattr(model, "config", None), "max_seq_len", None)
    if context:
        max_new_tokens = min(max_new_tokens, context - 1)
    keep = [n for n in (max_prompt_tokens, context and context - max_new_tokens) if n]
    if keep:
        prompts = [p[-max(1, min(keep)):] for p in prompts]
    device = next(model.parameters()).device
    batch_size = batch_size or (64 if device.type == "cuda" else 16)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # little padding per batch
    results: list[list[int]] = [[] for _ in prompts]
    for first in range(0, len(order), batch_size):
        rows = order[first:first + batch_size]
        width = max(len(prompts[i]) for i in rows)
        input_ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for b, i in enumerate(rows):
            input_ids[b, width - len(prompts[i]):] = torch.tensor(prompts[i])
            mask[b, width - len(prompts[i]):] = 1
        extra = {"logits_processor": logits_processor_for(rows)} if logits_processor_for is not None else {}
        if temperature > 0:
            extra.update(temperature=temperature, generator=generator)
        out = model.generate(input_ids.to(device), max_new_tokens=max_new_tokens, eos_token_id=stop_ids or None,
                             attention_mask=mask.to(device), **extra)
        for b, i in enumerate(rows):
            new = out[b, width:].tolist()
            stop = next((k for k, t in enumerate(new) if t in stop_ids), None)
            results[i] = new if stop is None else new[: stop + 1]
    return results


@contextmanager
def decoding_threads(model):
    """On CPU, decode with one intra-op thread: one token's matmuls are too small to share, and thread
    synchronisation made batch-1 decoding of the tiny model 13x slower on a busy 2-core machine."""
    on_cpu = next(model.parameters()).device.type == "cpu"
    before = torch.get_num_threads()
    if on_cpu and before > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def decoding_model(trainer, pl_module):
    """The module to decode with during a fit, on rank 0; ``None`` on the other ranks.

    ``pl_module`` itself, except under Lightning's ``FSDPStrategy``: there each rank holds only a shard
    of the weights, and the FSDP units gather theirs only inside the strategy's training or validation
    step, all ranks together, so ``pl_module.generate`` called from a callback fails (the embedding is a
    1-D shard) and decoding on all ranks in lock step would hang as soon as their stop tokens differ. Under
    FSDP the full weights are gathered to rank 0 (``strategy.lightning_module_state_dict()``, the same
    gather a full checkpoint does) and loaded into an unsharded, uncompiled copy on rank 0's device, which
    rank 0 decodes with alone. Every rank must call this: the gather is collective. The copy costs one
    model's float32 weights on rank 0's GPU while it is referenced.
    """
    from lightning.pytorch.strategies import FSDPStrategy

    if not isinstance(trainer.strategy, FSDPStrategy):
        return pl_module if trainer.is_global_zero else None
    if getattr(trainer.strategy, "_state_dict_type", "full") != "full":  # Lightning keeps the choice privately
        raise StagewiseError("decoding during an FSDP fit (TextSamples, ToolCallEval) gathers the full weights and "
                             "needs the strategy's state_dict_type: full, as in configs/strategies/fsdp.yaml; "
                             "set it, or leave these callbacks out of this run")
    state = trainer.strategy.lightning_module_state_dict()  # collective; the full weights on rank 0 only
    if not trainer.is_global_zero:
        return None
    with torch.device(pl_module.device):
        return type(pl_module).from_state(pl_module.hparams, state, compile=False, init_from=None)
