"""`stagewise interpolate`: blends of a parent and a child checkpoint, their losses, the chosen blend."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from datamodules.errors import StagewiseError, TokenizerMismatchError
from lightning_modules.causal_lm import CausalLM
from lightning_modules.interpolate import blend, choose_alpha, evaluate, interpolate

VOCAB, T = 64, 16


def batches(domain: str, n: int) -> list[dict]:
    """Domain "a": token t+1 = t+1; domain "b": t+1 = 3t+5 (mod VOCAB), from random starts."""
    step = {"a": lambda t: (t + 1) % VOCAB, "b": lambda t: (3 * t + 5) % VOCAB}[domain]
    g = torch.Generator().manual_seed(len(domain) + n)
    x = torch.zeros(4 * n, T + 1, dtype=torch.long)
    x[:, 0] = torch.randint(0, VOCAB, (4 * n,), generator=g)
    for t in range(T):
        x[:, t + 1] = step(x[:, t])
    return [{"input_ids": b[:, :-1], "targets": b[:, 1:]} for b in x.split(4)]


class TwoDomains(L.LightningDataModule):
    """Stand-in for CorpusDataModule: trains on ``corpus``, validates on ["a", "b"]."""

    def __init__(self, corpus: str = "a") -> None:
        super().__init__()
        self.corpus, self.val_domains, self.tokenizer_sha256 = corpus, ["a", "b"], "tok"

    def train_dataloader(self):
        return DataLoader(batches(self.corpus, 8), batch_size=None)

    def val_dataloader(self):
        return [DataLoader(batches(d, 2), batch_size=None) for d in self.val_domains]


def train(tmp_path, name: str, corpus: str, init_from: str | None = None, **kw) -> str:
    torch.manual_seed(0)
    hp = {"size": "tiny", "model_overrides": {"n_layers": 2}, "vocab_size": VOCAB, "tokenizer_sha256": "tok", "lr": 1e-2, "warmup_steps": 1, **kw}
    model = CausalLM(init_from=init_from, **hp)
    trainer = L.Trainer(max_steps=8, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", num_sanity_val_steps=0,
                        limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(model, datamodule=TwoDomains(corpus))
    path = str(tmp_path / f"{name}.ckpt")
    trainer.save_checkpoint(path)
    return path


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("stages")
    parent = train(tmp, "parent", "a")
    return parent, train(tmp, "child", "b", init_from=parent)


def losses_of(path: str) -> dict[str, float]:
    return evaluate(CausalLM.load_from_checkpoint(path, map_location="cpu"), TwoDomains(), "cpu")


def test_endpoints_are_the_parent_and_the_child(stages, tmp_path):
    parent, child = stages
    out = tmp_path / "blend.ckpt"
    summary = interpolate(parent, child, TwoDomains(), alphas=[0, 0.5, 1], choose="0",
                          out=str(out), report=str(tmp_path / "report.json"), accelerator="cpu")
    by_alpha = {r["alpha"]: r["losses"] for r in summary["results"]}
    assert by_alpha[0.0] == pytest.approx(losses_of(parent), rel=1e-6)
    assert by_alpha[1.0] == pytest.approx(losses_of(child), rel=1e-6)
    assert by_alpha[1.0]["b"] < by_alpha[0.0]["b"] and by_alpha[0.0]["a"] < by_alpha[1.0]["a"]  # it forgot "a"
    saved = torch.load(out, weights_only=False)
    for k, v in torch.load(parent, weights_only=False)["state_dict"].items():
        assert torch.equal(saved["state_dict"][k], v)
    assert json.loads((tmp_path / "report.json").read_text())["chosen_alpha"] == 0.0


def test_chosen_blend_is_a_loadable_checkpoint_with_the_childs_hparams(stages, tmp_path):
    parent, child = stages
    out = tmp_path / "wise.ckpt"
    summary = interpolate(parent, child, TwoDomains(), alphas=[0, 0.5, 1], out=str(out), accelerator="cpu")
    chosen = summary["chosen_alpha"]
    rel = {r["alpha"]: r["relative_mean"] for r in summary["results"]}
    assert rel[chosen] == min(rel.values())
    model = CausalLM.load_from_checkpoint(out, map_location="cpu")
    assert model.hparams.init_from == parent and model.hparams.tokenizer_sha256 == "tok"
    expected = blend(torch.load(parent, weights_only=False)["state_dict"],
                     torch.load(child, weights_only=False)["state_dict"], chosen)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, expected[k])
    by_alpha = {r["alpha"]: r["losses"] for r in summary["results"]}
    assert losses_of(str(out)) == pytest.approx(by_alpha[chosen], rel=1e-6)


def test_blend_is_linear_per_tensor():
    p, c = {"w": torch.zeros(3), "n": torch.tensor(1)}, {"w": torch.full((3,), 4.0), "n": torch.tensor(7)}
    out = blend(p, c, 0.25)
    assert out["w"].tolist() == [1.0, 1.0, 1.0] and out["n"].item() == 7


def test_choose_weights_and_errors():
    results = [{"alpha": 0.0, "losses": {"a": 1.0, "b": 4.0}}, {"alpha": 1.0, "losses": {"a": 2.0, "b": 2.0}}]
    assert choose_alpha(results, "a=1") == 0.0 and choose_alpha(results, "b=1") == 1.0
    assert choose_alpha(results, "best_mean") == 0.0  # (1 + 2)/2 = 1.5 vs (2 + 1)/2 = 1.5: first wins
    with pytest.raises(StagewiseError, match="unknown domains"):
        choose_alpha(results, "code=1")
    with pytest.raises(StagewiseError, match="not among"):
        choose_alpha(results, "0.5")


def test_refuses_other_shapes_and_tokenizers(stages, tmp_path):
    parent, child = stages

    def variant(name, change):
        ckpt = torch.load(child, weights_only=False)
        change(ckpt)
        torch.save(ckpt, tmp_path / name)
        return str(tmp_path / name)

    wide = variant("wide.ckpt", lambda c: c["state_dict"].update({"model.norm.weight": torch.ones(128)}))
    with pytest.raises(StagewiseError, match="model.norm.weight.*one model size"):
        interpolate(parent, wide, TwoDomains(), alphas=[0.5], accelerator="cpu")
    other = variant("other.ckpt", lambda c: c["hyper_parameters"].update({"tokenizer_sha256": "another"}))
    with pytest.raises(TokenizerMismatchError):
        interpolate(parent, other, TwoDomains(), alphas=[0.5], accelerator="cpu")


def test_a_child_blended_with_another_parent_says_its_lineage_is_broken(stages, tmp_path, capsys):
    import shutil

    from datamodules.stage_record import file_sha256, update_stage_record

    parent, child = stages
    models = tmp_path / "models" / "exp"
    models.mkdir(parents=True)
    language, code = models / "language_model_best.ckpt", models / "code_model_best.ckpt"
    shutil.copy(parent, language)
    shutil.copy(child, code)
    update_stage_record(models, "language", {"checkpoint": {"path": str(language), "sha256": file_sha256(language)}})
    update_stage_record(models, "code", {"checkpoint": {"path": str(code), "sha256": file_sha256(code)},
                                         "parent": {"stage": "language", "path": str(language),
                                                    "sha256": file_sha256(language)}})
    report = tmp_path / "report.json"
    summary = interpolate(str(language), str(code), TwoDomains(), alphas=[0, 1], report=str(report), accelerator="cpu")
    assert summary["lineage"].startswith("checked") and "lineage broken" not in capsys.readouterr().err
    other = models / "other_model_best.ckpt"  # the child itself, as a stand-in for an unrelated parent
    shutil.copy(child, other)
    summary = interpolate(str(other), str(code), TwoDomains(), alphas=[0, 1], report=str(report), accelerator="cpu")
    assert len(summary["lineage"]) == 1 and "not its parent" in summary["lineage"][0]
    assert json.loads(report.read_text())["lineage"] == summary["lineage"]
    assert "stagewise interpolate: lineage broken:" in capsys.readouterr().err
