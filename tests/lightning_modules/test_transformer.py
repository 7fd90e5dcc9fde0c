import pytest
import torch

from datamodules.errors import StagewiseError
from lightning_modules.transformer import PRESETS, Transformer, TransformerConfig


def tiny(**overrides) -> Transformer:
    torch.manual_seed(0)
    return Transformer(TransformerConfig.from_preset("tiny", vocab_size=64, **overrides)).eval()


def test_logits_shape():
    ids = torch.randint(0, 64, (3, 10))
    assert tiny()(ids).shape == (3, 10, 64)


def test_causal_future_tokens_never_change_past_logits():
    model = tiny()
    ids = torch.randint(0, 64, (1, 12))
    changed = ids.clone()
    changed[0, 6:] = (changed[0, 6:] + 1) % 64
    a, b = model(ids), model(changed)
    torch.testing.assert_close(a[:, :6], b[:, :6])
    assert not torch.allclose(a[:, 6:], b[:, 6:])


def test_gqa_equals_multi_head_with_repeated_kv_weights():
    gqa = tiny(n_heads=4, n_kv_heads=2)
    mha = tiny(n_heads=4, n_kv_heads=4)
    state = gqa.state_dict()
    hd = gqa.config.head_dim
    for i in range(gqa.config.n_layers):
        key = f"layers.{i}.attn.qkv.weight"
        q, k, v = state[key].split([4 * hd, 2 * hd, 2 * hd])
        # kv head j serves query heads 2j and 2j+1
        rep = lambda w: w.view(2, hd, -1).repeat_interleave(2, dim=0).reshape(4 * hd, -1)  # noqa: E731
        state[key] = torch.cat([q, rep(k), rep(v)])
    mha.load_state_dict(state)
    ids = torch.randint(0, 64, (2, 9))
    torch.testing.assert_close(gqa(ids), mha(ids))


@pytest.mark.parametrize(
    "size,named,vocab",
    [("tiny", 1e6, 8192), ("small", 30e6, 32768), ("base", 124e6, 32768), ("medium", 350e6, 32768),
     ("large", 760e6, 32768), ("xl", 1.1e9, 32768)],
)
def test_preset_sizes_match_their_names(size, named, vocab):
    with torch.device("meta"):
        model = Transformer(TransformerConfig.from_preset(size, vocab_size=vocab))
    assert abs(model.num_parameters(non_embedding=True) / named - 1) <= 0.15


def test_tied_embeddings_share_one_matrix():
    model = tiny(tie_embeddings=True)
    assert model.lm_head.weight is model.tok_embeddings.weight
    untied = tiny()
    assert untied.num_parameters(False) - model.num_parameters(False) == 64 * model.config.d_model
    assert untied.num_parameters(True) == model.num_parameters(True)


def test_scaled_init_of_output_projections():
    model = Transformer(TransformerConfig.from_preset("small", vocab_size=512, n_layers=8))
    assert model.layers[0].attn.qkv.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.layers[0].attn.out.weight.std().item() == pytest.approx(0.02 / 4, rel=0.05)
    assert model.layers[0].mlp.down.weight.std().item() == pytest.approx(0.02 / 4, rel=0.05)


def test_kv_cache_decoding_equals_full_recompute():
    model = tiny()
    ids = torch.randint(0, 64, (2, 7))
    cache = model.make_cache(2, 16)
    logits = [model(ids[:, :4], cache)]
    logits += [model(ids[:, 4:6], cache), model(ids[:, 6:], cache)]  # a chunk, then one token
    torch.testing.assert_close(torch.cat(logits, dim=1), model(ids), atol=1e-5, rtol=1e-5)
    assert cache.pos == 7


def test_kv_cache_under_autocast_keeps_the_autocast_dtype():
    """Keys and values leave the projections in bf16 under autocast: a float32 cache would be cast back,
    whole, on every decoding step. The cached decode matches the full bf16 forward."""
    model = tiny()
    ids = torch.randint(0, 64, (2, 7))
    assert model.make_cache(2, 16).layers[0].k.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cache = model.make_cache(2, 16)
        assert cache.layers[0].k.dtype == torch.bfloat16
        stepped = torch.cat([model(ids[:, :6], cache), model(ids[:, 6:], cache)], dim=1)
        full = model(ids)
    torch.testing.assert_close(stepped.float(), full.float(), atol=0.1, rtol=0.05)


def test_left_padded_batch_gives_each_row_its_unpadded_logits():
    model = tiny()
    ids = torch.randint(0, 64, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[0, :4] = 0  # row 0: 4 padding slots, then 5 tokens
    padded = model(ids, attention_mask=mask)
    torch.testing.assert_close(padded[0, 4:], model(ids[:1, 4:])[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(padded[1], model(ids[1:])[0], atol=1e-5, rtol=1e-5)
    # with a cache, the mask and each row's position carry over to the next (unpadded) tokens
    cache = model.make_cache(2, 12)
    model(ids[:, :7], cache, attention_mask=mask[:, :7])
    step = model(ids[:, 7:], cache)
    torch.testing.assert_close(step[0], model(ids[:1, 4:])[0, -2:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(step[1], model(ids[1:])[0, -2:], atol=1e-5, rtol=1e-5)
    assert torch.isfinite(padded).all()


def test_too_long_sequence_is_a_clear_error():
    with pytest.raises(StagewiseError, match="max_seq_len"):
        tiny(max_seq_len=8)(torch.zeros(1, 9, dtype=torch.long))


def test_unknown_size_or_field_lists_valid_choices():
    with pytest.raises(StagewiseError, match="tiny, small, base, medium, large, xl"):
        TransformerConfig.from_preset("huge")
    with pytest.raises(StagewiseError, match="n_layers"):
        TransformerConfig.from_preset("tiny", n_layer=3)
    with pytest.raises(StagewiseError, match="n_kv_heads"):
        TransformerConfig.from_preset("tiny", n_kv_heads=3)
    assert set(PRESETS) == {"tiny", "small", "base", "medium", "large", "xl"}


def test_rope_tables_are_computed_once_and_stay_out_of_the_state_dict():
    from lightning_modules.transformer import rope_cos_sin

    model = tiny()
    cos, sin = rope_cos_sin(model.config.max_seq_len, model.config.head_dim, model.config.rope_theta)
    assert torch.equal(model.rope_cos, cos) and torch.equal(model.rope_sin, sin)
    assert not any(k.startswith("rope_") for k in model.state_dict())
    with torch.device("meta"):  # how sharded strategies build it
        meta = Transformer(model.config)
    meta.to_empty(device="cpu")
    meta.reset_parameters()
    assert torch.equal(meta.rope_cos, cos)


def test_next_token_samples_from_the_temperature_and_top_k_it_is_given():
    """Greedy is the argmax; top_k=1 is greedy at any temperature; flat logits sampled spread over the vocabulary
    and follow the generator's seed."""
    from lightning_modules.decoding import next_token

    logits = torch.randn(4, 64)
    assert torch.equal(next_token(logits), logits.argmax(-1))
    assert torch.equal(next_token(logits, 2.0, top_k=1, generator=torch.Generator().manual_seed(0)), logits.argmax(-1))
    flat = torch.zeros(256, 64)
    draw = lambda seed: next_token(flat, 1.0, generator=torch.Generator().manual_seed(seed))  # noqa: E731
    assert len(set(draw(0).tolist())) > 16 and torch.equal(draw(0), draw(0)) and not torch.equal(draw(0), draw(1))
    top2 = next_token(torch.tensor([[0.0, 5.0, 4.9, -9.0]] * 256), 1.0, top_k=2, generator=torch.Generator().manual_seed(0))
    assert set(top2.tolist()) == {1, 2}
