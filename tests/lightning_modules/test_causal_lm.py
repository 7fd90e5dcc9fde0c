import math

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from datamodules.errors import StagewiseError, TokenizerMismatchError
from lightning_modules import CausalLM
from lightning_modules.causal_lm import cross_entropy, lr_factor

VOCAB = 64


def tiny_lm(**kwargs) -> CausalLM:
    torch.manual_seed(0)
    kwargs = {"size": "tiny", "vocab_size": VOCAB, "warmup_steps": 1, "lr": 1e-2, **kwargs}
    return CausalLM(**kwargs)


def loader(make_batch, n=4, **kwargs):
    return DataLoader([make_batch(seed=i, **kwargs) for i in range(n)], batch_size=None)


def trainer(tmp_path, **kwargs) -> L.Trainer:
    kwargs = {"max_steps": 2, "logger": False, "enable_checkpointing": False, "enable_progress_bar": False,
              "enable_model_summary": False, "default_root_dir": tmp_path, "num_sanity_val_steps": 0,
              "accelerator": "cpu", **kwargs}
    return L.Trainer(**kwargs)


def test_schedules():
    cos = [lr_factor(s, 100, 10, "cosine", 0.1) for s in range(101)]
    assert cos[0] == pytest.approx(0.1) and cos[9] == pytest.approx(1.0)  # linear warmup
    assert all(a >= b for a, b in zip(cos[10:], cos[11:]))
    assert cos[100] == pytest.approx(0.1) and cos[55] == pytest.approx(0.55)
    assert [lr_factor(s, 100, 10, "constant") for s in (10, 99)] == [1.0, 1.0]
    wsd = [lr_factor(s, 100, 10, "wsd", 0.1, decay_fraction=0.2) for s in range(101)]
    assert wsd[10:81] == [1.0] * 71  # plateau until the last 20%
    assert wsd[90] == pytest.approx(0.55) and wsd[100] == pytest.approx(0.1)


def test_weight_decay_only_on_matrices_not_embeddings_or_norms():
    model = tiny_lm(weight_decay=0.3)
    model.configure_model()
    decay, no_decay = model.param_groups()
    assert decay["weight_decay"] == 0.3 and no_decay["weight_decay"] == 0.0
    ids = lambda group: {id(p) for p in group["params"]}  # noqa: E731
    names = {id(p): n for n, p in model.model.named_parameters()}
    assert all(names[i].endswith(("qkv.weight", "out.weight", "gate_up.weight", "down.weight", "lm_head.weight"))
               for i in ids(decay))
    assert {names[i] for i in ids(no_decay)} >= {"tok_embeddings.weight", "norm.weight", "layers.0.attn_norm.weight"}
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.model.parameters()))


def test_weight_decay_groups_survive_fsdp_flattening_parameters():
    model = tiny_lm(weight_decay=0.3)
    model.configure_model()
    before = [{id(p) for p in group["params"]} for group in model.param_groups()]
    for p in model.model.parameters():  # what FSDP's use_orig_params does: same objects, 1-D shard views
        p.data = p.data.flatten()[: p.numel() // 2]
    assert [{id(p) for p in group["params"]} for group in model.param_groups()] == before


def test_gradients_are_freed_right_after_each_optimizer_step(tmp_path, make_batch):
    """Lightning zeroes gradients after the next forward pass; held that long, they add a model-sized block
    of float32 to the peak memory of every step."""
    seen = []

    class GradsAtBatchStart(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(sum(p.grad is not None for p in pl_module.parameters()))

    model = tiny_lm()
    trainer(tmp_path, max_steps=3, callbacks=[GradsAtBatchStart()]).fit(model, loader(make_batch))
    assert seen == [0, 0, 0]
    accumulating = tiny_lm()  # between micro-batches of one step the gradients must stay
    trainer(tmp_path, max_steps=2, accumulate_grad_batches=2, callbacks=[GradsAtBatchStart()]).fit(
        accumulating, loader(make_batch))
    n = len(list(accumulating.parameters()))
    assert seen[3:] == [0, n, 0, n]


def test_training_logs_and_lr_follows_schedule(tmp_path, make_batch):
    model = tiny_lm(warmup_steps=2, schedule="constant")
    t = trainer(tmp_path, max_steps=3)
    t.fit(model, loader(make_batch))
    m = t.callback_metrics
    assert {"train/loss", "train/lr", "train/tokens", "train/grad_norm"} <= set(m)
    assert m["train/tokens"] == 3 * 2 * 16 == model.tokens_seen
    assert m["train/lr"] == pytest.approx(1e-2)  # step 2 is past the warmup
    assert model.optimizer_steps == 3


def test_loss_mask_zero_positions_contribute_nothing(make_batch):
    batch = make_batch(with_mask=True)
    logits = torch.randn(2, 16, VOCAB)
    loss, n = cross_entropy(logits, batch["targets"], batch["loss_mask"])
    other = batch["targets"].clone()
    other[batch["loss_mask"] == 0] = 0  # change only unmasked targets
    other_logits = logits.clone()
    other_logits[batch["loss_mask"] == 0] = 5.0
    assert cross_entropy(other_logits, other, batch["loss_mask"])[0] == pytest.approx(loss.item())
    assert n == batch["loss_mask"].sum()
    keep = batch["loss_mask"].bool()
    expected = torch.nn.functional.cross_entropy(logits[keep], batch["targets"][keep])
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


class TwoDomains(L.LightningDataModule):
    """Two val loaders: 'lang' has two batches of different sizes, 'tools' has masked batches."""

    val_domains = ["lang", "tools"]

    def __init__(self, make_batch):
        super().__init__()
        self.lang = [make_batch(batch_size=1, seed=1), make_batch(batch_size=3, seed=2)]
        self.tools = [make_batch(with_mask=True, seed=3), make_batch(batch_size=1, with_mask=True, seed=4)]

    def val_dataloader(self):
        return [DataLoader(self.lang, batch_size=None), DataLoader(self.tools, batch_size=None)]


def test_validation_per_domain_token_weighted(tmp_path, make_batch):
    model = tiny_lm()
    dm = TwoDomains(make_batch)
    t = trainer(tmp_path)
    t.validate(model, datamodule=dm, verbose=False)
    metrics = {k: v.item() for k, v in t.callback_metrics.items()}

    def expected(batches):
        with torch.no_grad():
            pairs = [cross_entropy(model.model(b["input_ids"]), b["targets"], b.get("loss_mask")) for b in batches]
        return sum(loss * n for loss, n in pairs).item() / sum(n for _, n in pairs).item()

    assert metrics["val/lang/loss"] == pytest.approx(expected(dm.lang), rel=1e-5)
    assert metrics["val/tools/loss"] == pytest.approx(expected(dm.tools), rel=1e-5)
    assert metrics["val/lang/ppl"] == pytest.approx(math.exp(metrics["val/lang/loss"]), rel=1e-5)
    # a second validation starts from fresh metrics (reset each epoch)
    t.validate(model, datamodule=dm, verbose=False)
    assert t.callback_metrics["val/lang/loss"].item() == pytest.approx(metrics["val/lang/loss"], rel=1e-6)


@pytest.mark.parametrize("precision,fused", [("32-true", False), ("bf16-mixed", True)])
def test_gradient_clipping_bounds_the_norm(tmp_path, make_batch, precision, fused):
    """Lightning alone refuses clipping with fused AdamW under mixed precision; ours clips."""
    clipped = []

    class Spy(L.Callback):
        def on_train_batch_end(self, trainer, module, *args):
            grads = [p.grad for p in module.parameters() if p.grad is not None]
            clipped.append(torch.nn.utils.get_total_norm(grads).item())

    model = tiny_lm(fused_adamw=fused)
    t = trainer(tmp_path, max_steps=2, gradient_clip_val=1e-3, precision=precision, callbacks=[Spy()])
    t.fit(model, loader(make_batch))
    assert t.callback_metrics["train/grad_norm"] > 1e-2  # the raw norm was well above the limit
    assert clipped and max(clipped) <= 1e-3 * 1.01
    assert bool(t.optimizers[0].param_groups[0]["fused"]) is fused


def save_parent(tmp_path, make_batch, **kwargs) -> tuple[str, CausalLM]:
    parent = tiny_lm(tokenizer_sha256="a" * 64, **kwargs)
    t = trainer(tmp_path, max_steps=2)
    t.fit(parent, loader(make_batch))
    path = str(tmp_path / "parent.ckpt")
    t.save_checkpoint(path)
    return path, parent


def test_init_from_loads_weights_with_fresh_optimizer(tmp_path, make_batch):
    path, parent = save_parent(tmp_path, make_batch)
    child = tiny_lm(tokenizer_sha256="a" * 64, init_from=path, lr=1e-9, warmup_steps=1)
    states = []

    class Spy(L.Callback):
        def on_train_start(self, trainer, module):
            states.append({k: v.clone() for k, v in module.model.state_dict().items()})
            states.append(trainer.optimizers[0].state_dict()["state"])

    t = trainer(tmp_path, max_steps=1, callbacks=[Spy()])
    t.fit(child, loader(make_batch))
    weights, opt_state = states
    for name, tensor in parent.model.state_dict().items():
        torch.testing.assert_close(weights[name], tensor)
    assert opt_state == {} and t.global_step == 1  # fresh optimizer, schedule from step 0
    assert child.parent_tokens == parent.tokens_seen == 64
    assert child.total_tokens == 64 + 32 and child.parent_optimizer_steps == 2


def test_init_from_errors(tmp_path, make_batch):
    path, _ = save_parent(tmp_path, make_batch)
    with pytest.raises(StagewiseError, match="no checkpoint at"):
        tiny_lm().load_init_from(tmp_path / "nowhere.ckpt")
    junk = tmp_path / "junk.ckpt"
    junk.write_text("not a checkpoint")
    other = tiny_lm(model_overrides={"d_model": 32})
    other.configure_model()
    with pytest.raises(StagewiseError, match="not a readable checkpoint"):
        other.load_init_from(junk)
    with pytest.raises(StagewiseError, match=r"'tok_embeddings.weight' is \(64, 64\) there but \(64, 32\) here"):
        other.load_init_from(path)
    mismatched = tiny_lm(tokenizer_sha256="b" * 64)
    mismatched.configure_model()
    with pytest.raises(TokenizerMismatchError, match="tokenizer"):
        mismatched.load_init_from(path)


def test_missing_init_from_fails_at_fit(tmp_path, make_batch):
    with pytest.raises(StagewiseError, match="no checkpoint at"):
        trainer(tmp_path).fit(tiny_lm(init_from=str(tmp_path / "gone.ckpt")), loader(make_batch))


def test_checkpoint_round_trip_keeps_counts(tmp_path, make_batch):
    path, parent = save_parent(tmp_path, make_batch)
    loaded = CausalLM.load_from_checkpoint(path)
    assert loaded.tokens_seen == 64 and loaded.optimizer_steps == 2
    assert loaded.hparams.vocab_size == VOCAB and loaded.hparams.tokenizer_sha256 == "a" * 64
    torch.testing.assert_close(loaded.model.lm_head.weight, parent.model.lm_head.weight)


def test_compile_keeps_state_dict_keys():
    model = tiny_lm(compile=True)
    model.configure_model()
    assert hasattr(model.training_loss, "_torchdynamo_orig_callable")
    assert hasattr(model.validation_loss.compiled, "_torchdynamo_orig_callable")
    assert set(model.state_dict()) == {"model." + k for k in tiny_lm().build_model().state_dict()}


def test_a_held_out_loaders_short_last_batch_is_scored_eagerly_not_recompiled(monkeypatch):
    """Full batches of each kind (window length, mask or not) go through the compiled loss, a shorter one of a
    kind already seen (a loader's last) through the eager one; the two give the same numbers."""
    import lightning_modules.causal_lm as causal_lm

    calls = []

    def fake_compile(fn):
        def compiled(*args):
            calls.append(("compiled", tuple(args[0].shape), args[2] is not None))
            return fn(*args)
        return compiled

    monkeypatch.setattr(causal_lm.torch, "compile", fake_compile)
    model = tiny_lm(compile=True)
    model.configure_model()
    mask = lambda b, t: torch.ones(b, t, dtype=torch.long)  # noqa: E731
    batches = [(4, 8, None), (4, 8, None), (2, 8, None), (4, 16, mask(4, 16)), (3, 16, mask(3, 16)), (3, 8, mask(3, 8))]
    for b, t, m in batches:
        ids = torch.randint(0, VOCAB, (b, t))
        loss, n = model.validation_loss(ids, ids, m)
        eager = causal_lm.cross_entropy(model.model(ids), ids, m)
        torch.testing.assert_close((loss, n), eager)
    assert calls == [("compiled", (4, 8), False), ("compiled", (4, 8), False), ("compiled", (4, 16), True),
                     ("compiled", (3, 8), True)]  # (2, 8) and (3, 16): eager; (3, 8) with a mask: a new kind


def test_generate_with_cache_equals_greedy_full_recompute():
    model = tiny_lm()
    model.configure_model()
    prompt = torch.randint(0, VOCAB, (2, 5))
    out = model.generate(prompt, max_new_tokens=6)
    ids = prompt
    for _ in range(6):
        with torch.no_grad():
            ids = torch.cat([ids, model.model(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, ids)
    assert model.training  # mode restored
    eos = int(out[0, 5])
    stopped = model.generate(prompt[:1], max_new_tokens=6, eos_token_id=eos)
    assert stopped.shape == (1, 6) and stopped[0, -1] == eos


def test_static_decoding_step_gives_the_growing_cache_tokens_padded_or_not():
    """decode_step (all cache slots, masked; what a GPU replays as a CUDA graph) decodes the same tokens as
    forward with a growing cache, for left-padded and unpadded batches, stopping rows included."""
    model = tiny_lm()
    model.configure_model()
    prompt = torch.randint(0, VOCAB, (3, 9))
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[0, :4] = 0
    free = model.generate(prompt, max_new_tokens=12, attention_mask=mask, static=False)
    stops = [int(free[1, 12]), int(free[2, 15])]  # row 1 stops at its 4th new token, row 2 at its 7th
    for attention_mask in (mask, None):
        growing = model.generate(prompt, 12, eos_token_id=stops, attention_mask=attention_mask, static=False)
        static = model.generate(prompt, 12, eos_token_id=stops, attention_mask=attention_mask, static=True)
        assert torch.equal(static, growing)
    assert model.model.static_decoding()


def test_sampling_follows_its_generator_and_top_k_1_is_greedy():
    model = tiny_lm()
    model.configure_model()
    prompt = torch.randint(0, VOCAB, (2, 5))
    draw = lambda seed, **kw: model.generate(prompt, 8, temperature=1.5, generator=torch.Generator().manual_seed(seed), **kw)  # noqa: E731
    assert torch.equal(draw(1), draw(1)) and not torch.equal(draw(1), draw(2))
    assert torch.equal(draw(3, top_k=1), model.generate(prompt, 8))


def test_unknown_architecture_or_size_is_a_clear_error():
    with pytest.raises(StagewiseError, match="choose one of: dense"):
        CausalLM(architecture="moe")
    with pytest.raises(StagewiseError, match="tiny, small, base"):
        CausalLM(size="giant")


# --- examples that override CausalLM's hooks (experiments/examples/) --------------------------------


def test_label_smoothing_example_changes_the_training_loss_only(tmp_path, make_batch):
    from jsonargparse import ArgumentParser

    from experiments.examples.label_smoothing import LabelSmoothingLM

    parser = ArgumentParser()
    parser.add_class_arguments(LabelSmoothingLM, "model")  # what `stagewise fit --model ...` relies on
    cfg = parser.parse_args(["--model.label_smoothing", "0.2", "--model.size", "tiny", "--model.lr", "0.01"])
    assert cfg.model.label_smoothing == 0.2 and cfg.model.size == "tiny"

    model = LabelSmoothingLM(label_smoothing=0.2, size="tiny", vocab_size=VOCAB, warmup_steps=1)
    assert model.hparams.label_smoothing == 0.2 and model.hparams.size == "tiny"
    batch = make_batch(with_mask=True)
    logits = torch.randn(2, 16, VOCAB)
    plain = cross_entropy(logits, batch["targets"], batch["loss_mask"])[0]
    keep = batch["loss_mask"].bool()
    uniform = -torch.log_softmax(logits, -1)[keep].mean()  # cross-entropy against the uniform distribution
    expected = 0.8 * plain + 0.2 * uniform
    assert model.compute_loss(logits, batch["targets"], batch["loss_mask"]).item() == pytest.approx(expected.item())
    trainer(tmp_path, max_steps=2).fit(model, loader(make_batch))
    assert model.optimizer_steps == 2


def test_sliding_window_example(tmp_path, make_batch):
    from experiments.examples.sliding_window_attention import SlidingWindowLM

    dense = tiny_lm(model_overrides={"n_layers": 1})
    dense.configure_model()
    windowed = SlidingWindowLM(window=4, size="tiny", vocab_size=VOCAB, model_overrides={"n_layers": 1})
    windowed.configure_model()
    windowed.model.load_state_dict(dense.model.state_dict())
    wide = SlidingWindowLM(window=64, size="tiny", vocab_size=VOCAB, model_overrides={"n_layers": 1})
    wide.configure_model()
    wide.model.load_state_dict(dense.model.state_dict())

    ids = torch.randint(0, VOCAB, (1, 12))
    changed = ids.clone()
    changed[0, 3] = (changed[0, 3] + 1) % VOCAB
    with torch.no_grad():
        torch.testing.assert_close(wide.model(ids), dense.model(ids))  # window >= T: plain causal attention
        a, b = windowed.model(ids), windowed.model(changed)
    torch.testing.assert_close(a[:, 7:], b[:, 7:])  # position 7 sees 4..7, not 3
    assert not torch.allclose(a[:, 3:7], b[:, 3:7])

    out = windowed.generate(ids[:, :5], max_new_tokens=5)  # cached decoding keeps the window
    seq = ids[:, :5]
    for _ in range(5):
        with torch.no_grad():
            seq = torch.cat([seq, windowed.model(seq)[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(out, seq)
    trainer(tmp_path, max_steps=2).fit(windowed, loader(make_batch))


def test_per_window_loss_weighs_every_window_alike():
    """``loss_weighting: windows``: a window with two counted tokens weighs as much as one with six."""
    torch.manual_seed(0)
    logits, targets = torch.randn(2, 6, 11), torch.randint(0, 11, (2, 6))
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 1, 1]], dtype=torch.float32)
    per_token = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view(2, 6)
    window_means = [per_token[0].mean(), per_token[1, 4:].mean()]
    loss, n = cross_entropy(logits, targets, mask, per_window=True)
    assert loss.item() == pytest.approx(((window_means[0] + window_means[1]) / 2).item()) and n.item() == 8
    assert cross_entropy(logits, targets, mask)[0].item() == pytest.approx((per_token * mask).sum().item() / 8)
    empty = torch.tensor([[1, 1, 1, 1, 1, 1], [0] * 6], dtype=torch.float32)  # a window with nothing to learn: left out
    assert cross_entropy(logits, targets, empty, per_window=True)[0].item() == pytest.approx(window_means[0].item())


def test_compile_defaults_to_the_trainers_device():
    """``compile: None`` compiles under a Trainer on CUDA only (on the CPU compilation costs more than it saves)."""
    import lightning as L

    from lightning_modules.causal_lm import CausalLM

    import types

    module = CausalLM(size="tiny")
    assert module.compiles is False  # no Trainer
    module.trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False)
    assert module.compiles is False
    # a Trainer whose strategy runs on a GPU (only its device is read)
    module._trainer = types.SimpleNamespace(strategy=types.SimpleNamespace(root_device=torch.device("cuda", 0)))
    assert module.compiles is True
    assert CausalLM(size="tiny", compile=False).compiles is False
    assert CausalLM(size="tiny", compile=True).compiles is True
