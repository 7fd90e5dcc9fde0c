"""PreferenceLM: the DPO / IPO loss by hand, a frozen reference that is never saved, and a tiny preference
stage through the command line that ends preferring the chosen answers of held-out pairs."""

import copy
import json
import math
import shutil
from pathlib import Path

import lightning as L
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from datamodules.errors import StagewiseError
from datamodules.preference import PreferenceDataModule
from lightning_modules.cli import main
from lightning_modules.evaluate import load_model
from lightning_modules.pairs import pairs
from lightning_modules.preference_lm import PreferenceLM, preference_loss

REPO = Path(__file__).resolve().parents[2]
PREFERENCE_STAGE = str(REPO / "configs" / "stages" / "preference.yaml")
TINY = str(REPO / "configs" / "model" / "tiny.yaml")


def test_dpo_and_ipo_losses_of_one_pair_by_hand():
    # log-ratios: chosen -1 - (-2) = 1, rejected -3 - (-2.5) = -0.5, h = 1.5
    args = [torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.5])]
    losses, chosen, rejected = preference_loss(*args, beta=0.5)
    assert losses.item() == pytest.approx(math.log(1 + math.exp(-0.75)))  # -log sigmoid(0.5 * 1.5)
    assert (chosen.item(), rejected.item()) == (0.5, -0.25)
    losses, _, _ = preference_loss(*args, beta=0.5, loss_type="ipo")
    assert losses.item() == pytest.approx((1.5 - 1 / (2 * 0.5)) ** 2)


def test_dpo_positive_penalises_only_a_chosen_answer_that_fell_below_the_reference():
    # chosen log-ratio 1 > 0: no penalty, the DPO loss as it is
    args = [torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.5])]
    assert preference_loss(*args, beta=0.5, dpop_lambda=5.0)[0].item() == pytest.approx(math.log(1 + math.exp(-0.75)))
    # chosen fell: log-ratio -1 - (-0.5) = -0.5, rejected -4 - (-2) = -2, h = 1.5, penalty 5 * 0.5 = 2.5
    args = [torch.tensor([-1.0]), torch.tensor([-4.0]), torch.tensor([-0.5]), torch.tensor([-2.0])]
    plain, chosen, _ = preference_loss(*args, beta=0.5)
    losses, chosen_dpop, _ = preference_loss(*args, beta=0.5, dpop_lambda=5.0)
    assert plain.item() == pytest.approx(math.log(1 + math.exp(-0.75)))
    assert losses.item() == pytest.approx(math.log(1 + math.exp(-0.5 * (1.5 - 2.5))))  # -log sigmoid(0.5 * -1)
    assert chosen_dpop.item() == chosen.item() == -0.25  # the rewards stay DPO's
    # its gradient raises the chosen answer's log-probability harder than DPO's
    policy_chosen = torch.tensor([-1.0], requires_grad=True)
    preference_loss(policy_chosen, *args[1:], beta=0.5, dpop_lambda=5.0)[0].sum().backward()
    dpop_grad = policy_chosen.grad.item()
    policy_chosen.grad = None
    preference_loss(policy_chosen, *args[1:], beta=0.5)[0].sum().backward()
    assert dpop_grad < policy_chosen.grad.item() < 0
    with pytest.raises(StagewiseError, match="sigmoid"):
        preference_loss(*args, beta=0.5, loss_type="ipo", dpop_lambda=5.0)
    with pytest.raises(StagewiseError, match="dpop_lambda"):
        PreferenceLM(size="tiny", vocab_size=32, dpop_lambda=-1.0)


def toy_module(swap: bool = False, **kwargs) -> PreferenceLM:
    """A tiny module with a reference that differs from its policy: a noisy copy of it, or with ``swap`` the
    original while the policy is the noisy copy."""
    torch.manual_seed(0)
    module = PreferenceLM(size="tiny", vocab_size=32, model_overrides={"n_layers": 1, "max_seq_len": 16}, **kwargs)
    module.configure_model()  # no Trainer: no reference; give it one that differs from the policy
    reference = copy.deepcopy(module.model).requires_grad_(False)
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    if swap:
        module.model, reference = reference.requires_grad_(True), module.model.requires_grad_(False)
    object.__setattr__(module, "reference", reference)
    return module


def by_hand(model, ids: torch.Tensor, answer_starts: list[int], mean: bool) -> list[float]:
    """Each row's answer log-probability, one token at a time: sum (or mean) over t >= start of log p(ids[t])."""
    out = []
    with torch.no_grad():
        logp = torch.log_softmax(model(ids[:, :-1]).double(), -1)
    for row, start in enumerate(answer_starts):
        terms = [logp[row, t - 1, ids[row, t]].item() for t in range(start, ids.shape[1])]
        out.append(sum(terms) / len(terms) if mean else sum(terms))
    return out


@pytest.mark.parametrize("loss_type,dpop_lambda", [("sigmoid", 0.0), ("ipo", 0.0), ("sigmoid", 3.0)])
def test_preference_outputs_on_a_toy_batch_match_a_hand_computation(loss_type, dpop_lambda):
    # with DPO-Positive the reference is the noiseless one, so the chosen answers are less likely under the policy
    module = toy_module(beta=0.2, loss_type=loss_type, sft_weight=0.5, dpop_lambda=dpop_lambda, swap=dpop_lambda > 0)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 32, (4, 9), generator=g)  # 2 pairs: rows 0,1 chosen, rows 2,3 their rejected
    starts = [5, 6, 5, 4]  # where each row's answer begins; the prompt before it is not scored
    mask = torch.zeros(4, 8)
    for row, start in enumerate(starts):
        mask[row, start - 1:] = 1  # target t-1 predicts token t
    out = module.preference_outputs(ids[:, :-1], ids[:, 1:], mask)

    mean = loss_type == "ipo"
    pol, ref = by_hand(module.model, ids, starts, mean), by_hand(module.reference, ids, starts, mean)
    h = [(pol[i] - ref[i]) - (pol[i + 2] - ref[i + 2]) for i in range(2)]
    fell = [max(0.0, ref[i] - pol[i]) for i in range(2)]  # DPO-Positive's penalty, of the chosen rows
    assert dpop_lambda == 0 or all(fell)
    losses = [math.log1p(math.exp(-0.2 * (x - dpop_lambda * f))) if loss_type == "sigmoid" else (x - 1 / 0.4) ** 2
              for x, f in zip(h, fell)]
    margins = [0.2 * x for x in h]
    nll = -sum(by_hand(module.model, ids[:2], starts[:2], mean=False)) / sum(9 - s for s in starts[:2])
    assert out["preference_loss"].item() == pytest.approx(sum(losses) / 2, rel=1e-4)
    assert out["sft_loss"].item() == pytest.approx(nll, rel=1e-4)
    assert out["loss"].item() == pytest.approx(sum(losses) / 2 + 0.5 * nll, rel=1e-4)
    assert out["reward_margin"].item() == pytest.approx(sum(margins) / 2, rel=1e-4, abs=1e-6)
    assert out["reward_accuracy"].item() == sum(m > 0 for m in margins) / 2
    assert out["chosen_logp"].item() == pytest.approx(sum(pol[:2]) / 2, rel=1e-4)
    assert out["rejected_logp"].item() == pytest.approx(sum(pol[2:]) / 2, rel=1e-4)


@pytest.fixture(scope="module")
def pair_data(tool_data_dir, tool_parent, tmp_path_factory):
    """A copy of the tool data dir with the pairs of ``tool_parent``."""
    data = tmp_path_factory.mktemp("pair_data") / "data"
    shutil.copytree(tool_data_dir, data)
    pairs(str(tool_parent), str(data), max_new_tokens=24, accelerator="cpu")
    return data


def test_reference_is_the_frozen_parent_and_is_never_saved(pair_data, tool_parent, tmp_path):
    dm = PreferenceDataModule(parent=str(tool_parent), data_dir=str(pair_data), seq_len=128, batch_size=4)
    module = PreferenceLM(size="tiny", model_overrides={"n_layers": 2}, vocab_size=dm.vocab_size,
                          tokenizer_sha256=dm.tokenizer_sha256, init_from=str(tool_parent), lr=1e-3, warmup_steps=1)
    trainer = L.Trainer(max_steps=3, limit_val_batches=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                        default_root_dir=tmp_path)
    trainer.fit(module, datamodule=dm)
    parent = {k[len("model."):]: v for k, v in torch.load(tool_parent, weights_only=False)["state_dict"].items()}
    reference = module.reference.state_dict()
    assert all(torch.equal(reference[k], v) for k, v in parent.items())  # unchanged by training
    assert not any(p.requires_grad for p in module.reference.parameters()) and not module.reference.training
    assert any(not torch.equal(p, parent[k]) for k, p in module.model.state_dict().items())  # the policy trained
    in_optimizer = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert not in_optimizer & {id(p) for p in module.reference.parameters()}
    # checkpoints hold the policy only: the parent's keys, no second copy
    trainer.save_checkpoint(tmp_path / "preference.ckpt")
    saved = torch.load(tmp_path / "preference.ckpt", weights_only=False)
    assert set(saved["state_dict"]) == {f"model.{k}" for k in parent}
    reloaded = PreferenceLM.load_from_checkpoint(tmp_path / "preference.ckpt")
    assert reloaded.reference is None and torch.equal(reloaded.model.lm_head.weight, module.model.lm_head.weight)
    # a run restored from that checkpoint (as --ckpt_path does) rebuilds its reference from init_from, the parent
    restored = PreferenceLM(**{k: v for k, v in module.hparams.items()})
    trainer = L.Trainer(limit_val_batches=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        accelerator="cpu", default_root_dir=tmp_path)
    trainer.validate(restored, datamodule=dm, ckpt_path=tmp_path / "preference.ckpt", verbose=False)
    assert torch.equal(restored.model.lm_head.weight, module.model.lm_head.weight)
    assert all(torch.equal(restored.reference.state_dict()[k], v) for k, v in parent.items())


def fit_argv(data: Path, parent: Path, *extra: str) -> list[str]:
    return ["fit", "-c", PREFERENCE_STAGE, "-c", TINY, "--data.init_args.data_dir", str(data),
            "--model.init_args.model_overrides", "{n_layers: 2}",
            "--model.init_args.init_from", str(parent), "--trainer.accelerator", "cpu", *extra]


def test_fit_without_the_pairs_of_its_parent_refuses_and_writes_nothing(tool_data_dir, tool_parent, tmp_path,
                                                                         monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main(fit_argv(tool_data_dir, tool_parent))
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err
    assert "no preference pairs for the parent" in err and "stagewise pairs --parent" in err
    with pytest.raises(SystemExit) as exit_:  # the pairs of another checkpoint than the one it starts from
        main(fit_argv(tool_data_dir, tool_parent, "--data.init_args.parent", str(tmp_path / "other.ckpt")))
    assert exit_.value.code == 2 and "name different checkpoints" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # no runs/, no models/


def test_tiny_preference_stage_prefers_the_chosen_answers_of_heldout_pairs(pair_data, tool_parent, tmp_path,
                                                                           monkeypatch):
    monkeypatch.chdir(tmp_path)
    parent = tmp_path / "parent" / "tools.ckpt"  # no stage.json beside it: the stage validates once at step 0
    parent.parent.mkdir()
    shutil.copyfile(tool_parent, parent)
    main(fit_argv(pair_data, parent, "--trainer.max_steps", "30", "--trainer.val_check_interval", "30",
                  "--model.init_args.lr", "3e-3", "--model.init_args.warmup_steps", "3",
                  "--data.init_args.seq_len", "128", "--data.init_args.batch_size", "4",
                  "--trainer.limit_val_batches", "8"))
    record = json.loads((tmp_path / "models" / "default" / "preference" / "stage.json").read_text())
    assert record["stage"] == "preference" and record["parent"]["sha256"] == json.loads(
        next((pair_data / "preference").glob("*/manifest.json")).read_text())["parent"]["sha256"]
    assert set(record["forgetting"]) == {"language", "code", "tools"}
    assert set(record["losses"]["final"]) == {"language", "code", "tools", "preference"}
    best = tmp_path / "models" / "default" / "preference_model_best.ckpt"
    loaded = load_model(best)  # as evaluate and pairs load it: the policy's weights, no reference
    assert getattr(loaded, "reference", None) is None
    assert torch.equal(loaded.model.lm_head.weight, torch.load(best, weights_only=False)["state_dict"]["model.lm_head.weight"])
    acc = EventAccumulator(str(tmp_path / "runs" / "default" / "preference"))
    acc.Reload()
    series = {name: [(e.step, e.value) for e in acc.Scalars(f"val/preference/{name}")]
              for name in ("reward_accuracy", "reward_margin", "chosen_logp", "rejected_logp", "loss")}
    (start, acc0), (end, acc1) = series["reward_accuracy"][0], series["reward_accuracy"][-1]
    assert start == 0 and end > start
    # at the start the policy is the reference: every reward is 0 (no pair counts as right), the loss log 2
    assert acc0 == 0 and series["reward_margin"][0][1] == 0 and series["loss"][0][1] == pytest.approx(math.log(2))
    # after 30 steps it ranks most held-out pairs right (better than chance) and its loss is below log 2
    assert acc1 > 0.5 and series["reward_margin"][-1][1] > 0 and series["loss"][-1][1] < math.log(2)
    gap = [c[1] - r[1] for c, r in zip(series["chosen_logp"], series["rejected_logp"])]
    assert gap[-1] > gap[0]  # the policy itself now prefers the chosen answers more than its parent did
    # the record carries the last validation's pair metrics too (the report card reads them there)
    assert record["val_metrics"]["final"]["val/preference/reward_accuracy"] == pytest.approx(acc1)
