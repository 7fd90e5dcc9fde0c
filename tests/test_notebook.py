"""notebooks/compare_runs.ipynb and its loader (lightning_modules/runs.py) on a tiny real run:
two staged stages (language, then code from language's best checkpoint) and a joint baseline."""

import json
import shutil
from pathlib import Path

import lightning as L
import nbformat
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from nbclient import NotebookClient
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader

from callbacks.stage_handoff import StageHandoff
from datamodules.errors import StagewiseError
from lightning_modules.causal_lm import CausalLM
from lightning_modules.runs import comparison_rows, domains, load_runs

NOTEBOOK = Path(__file__).parents[1] / "notebooks" / "compare_runs.ipynb"
VOCAB, SEQ, BATCH = 64, 16, 2


class RandomTokens(L.LightningDataModule):
    """Fixed random windows; one val loader per domain, named as CausalLM expects."""

    def __init__(self, val_domains: list[str]) -> None:
        super().__init__()
        self.val_domains = val_domains
        self.tokenizer_sha256 = "a" * 64
        self.tokenizer_dir = None

    def _windows(self, n: int, seed: int) -> list[dict]:
        ids = torch.randint(0, VOCAB, (n, SEQ + 1), generator=torch.Generator().manual_seed(seed))
        return [{"input_ids": w[:-1], "targets": w[1:]} for w in ids]

    def train_dataloader(self):
        return DataLoader(self._windows(32, 0), batch_size=BATCH)

    def val_dataloader(self):
        return [DataLoader(self._windows(4, 100 + i), batch_size=BATCH) for i, _ in enumerate(self.val_domains)]


def run_stage(name: str, val_domains: list[str], monitor: str, init_from: str | None = None) -> None:
    model = CausalLM(size="tiny", vocab_size=VOCAB, tokenizer_sha256="a" * 64, init_from=init_from,
                     model_overrides={"n_layers": 1, "max_seq_len": 64}, warmup_steps=1, lr=1e-2)
    best = ModelCheckpoint(dirpath="models/exp", filename=f"{name}_model_best", monitor=f"val/{monitor}/loss",
                           save_top_k=1, auto_insert_metric_name=False, enable_version_counter=False)
    trainer = L.Trainer(max_steps=4, val_check_interval=2, check_val_every_n_epoch=None, num_sanity_val_steps=0,
                        logger=TensorBoardLogger("runs", name="exp", version=name, default_hp_metric=False),
                        callbacks=[best, StageHandoff(name, "models/exp", export_hf=False, log_every_n_steps=1)],
                        log_every_n_steps=1, enable_progress_bar=False, enable_model_summary=False,
                        accelerator="cpu", devices=1)
    trainer.fit(model, datamodule=RandomTokens(val_domains))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("compare_runs")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        run_stage("language", ["language"], "language")
        run_stage("code", ["language", "code"], "code", init_from="models/exp/language_model_best.ckpt")
        run_stage("joint", ["language", "code"], "code")
    return root


def _events(run_dir: Path) -> dict[str, list]:
    acc = EventAccumulator(str(next(run_dir.glob("events.out.tfevents.*"))), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: acc.Scalars(tag) for tag in acc.Tags()["scalars"]}


def _record(root: Path, name: str) -> dict:
    return json.loads((root / "models" / "exp" / name / "stage.json").read_text())


def test_load_runs_finds_the_staged_path_its_token_offsets_and_the_baseline(tiny_run):
    runs = load_runs(tiny_run / "runs", models_dir=tiny_run / "models")
    assert list(runs) == ["exp"]
    exp = runs["exp"]
    assert list(exp) == ["language", "code", "joint"]  # staged by start on the token axis, then baselines
    assert [(r.parent, r.baseline) for r in exp.values()] == [(None, False), ("language", False), (None, True)]
    assert exp["language"].start_tokens == 0 and exp["joint"].start_tokens == 0
    assert exp["code"].start_tokens == _record(tiny_run, "language")["tokens"]["total"] > 0
    assert domains(exp) == ["language", "code"]
    # the code stage's curve continues on the lineage's token axis from where language's best checkpoint was
    assert exp["code"].scalars["val_tokens/code/loss"][0][0] == exp["code"].start_tokens + 2 * BATCH * SEQ


def test_comparison_rows_are_the_records_and_event_files_numbers(tiny_run):
    rows = {r["run"]: r for r in comparison_rows(load_runs(tiny_run / "runs", models_dir=tiny_run / "models")["exp"])}
    for name, row in rows.items():
        record, events = _record(tiny_run, name), _events(tiny_run / "runs" / "exp" / name)
        assert row["source"] == "stage.json"
        assert row["tokens"] == record["tokens"]["trained"] == 4 * BATCH * SEQ
        assert row["wall_time_s"] == record["wall_time_s"]
        assert row["final"] == record["losses"]["final"]
        for domain, best in row["best"].items():
            assert best == min(e.value for e in events[f"val/{domain}/loss"])
    assert rows["code"]["total_tokens"] == rows["code"]["tokens"] + _record(tiny_run, "language")["tokens"]["total"]


def test_without_stage_records_the_event_files_and_hparams_say_it_all(tiny_run):
    exp = load_runs(tiny_run / "runs", "exp", models_dir=tiny_run / "no_models")["exp"]
    assert exp["code"].parent == "language" and exp["joint"].baseline  # parent from hparams.yaml's init_from
    for row in comparison_rows(exp):
        events = _events(tiny_run / "runs" / "exp" / row["run"])
        assert row["source"] == "events"
        assert row["tokens"] == events["train/tokens"][-1].value
        assert row["final"] == {d: events[f"val/{d}/loss"][-1].value for d in row["final"]}
        stamps = [e.wall_time for series in events.values() for e in series]
        assert row["wall_time_s"] == pytest.approx(max(stamps) - min(stamps))


def test_another_experiments_records_and_runs_that_are_not_training_runs_are_left_out(tiny_run, tmp_path):
    """Records are looked up under the run's own experiment only; `<stage>.<something>` directories (a run moved
    aside by --overwrite, a `stagewise validate`) are not training runs."""
    for name in ("language", "code", "joint"):
        (tmp_path / "other" / name).mkdir(parents=True)
        (tmp_path / "other" / name / "stage.json").write_text(json.dumps(_record(tiny_run, name)))
    assert {r["source"] for r in comparison_rows(load_runs(tiny_run / "runs", models_dir=tmp_path)["exp"])} == {"events"}
    runs = tmp_path / "runs"
    shutil.copytree(tiny_run / "runs" / "exp", runs / "exp")
    for extra in ("code.20261201-101010", "code.validate/version_0"):
        shutil.copytree(tiny_run / "runs" / "exp" / "code", runs / "exp" / extra)
    assert list(load_runs(runs, models_dir=tiny_run / "models")["exp"]) == ["language", "code", "joint"]


def test_nothing_to_load_says_what_to_do(tmp_path):
    with pytest.raises(StagewiseError, match="no TensorBoard event files.*RUNS_DIR"):
        load_runs(tmp_path / "runs")
    (tmp_path / "runs" / "other" / "language").mkdir(parents=True)
    with pytest.raises(StagewiseError, match="check EXPERIMENT"):
        load_runs(tmp_path / "runs", "demo")


def test_notebook_runs_headless_and_shows_every_run_and_a_figure_per_domain(tiny_run):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    params = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    params.source = f'RUNS_DIR = "{tiny_run / "runs"}"\nEXPERIMENT = None\nMODELS_DIR = "{tiny_run / "models"}"'
    NotebookClient(nb, kernel_name="python3", timeout=120, resources={"metadata": {"path": str(NOTEBOOK.parent)}}
                   ).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 2  # language, code
    table = "\n".join(o.data["text/markdown"] for o in outputs if "text/markdown" in o.get("data", {}))
    for name in ("language", "code", "joint"):
        record, events = _record(tiny_run, name), _events(tiny_run / "runs" / "exp" / name)
        cells = [f"{record['tokens']['trained']:,}", f"{record['wall_time_s']:.0f}s"]
        cells += [f"{record['losses']['final'][d]:.3f} / {min(e.value for e in events[f'val/{d}/loss']):.3f}"
                  for d in record["losses"]["final"]]
        row = next(line for line in table.splitlines() if line.startswith(f"| {name} "))
        assert all(f" {cell} |" in row for cell in cells), (row, cells)
    assert "| joint (baseline) | – |" in table and "| code | language |" in table
