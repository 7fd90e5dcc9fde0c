"""``stagewise interpolate``: blend a parent and a child checkpoint's weights and measure every blend.

``(1-α)·parent + α·child`` per tensor (WiSE-FT: Wortsman et al., "Robust fine-tuning of zero-shot
models", CVPR 2022): α=0 is the parent, α=1 the child, in between often keeps most of what the child
learned while forgetting less of what the parent knew. Each blend's per-domain held-out loss is
measured with the DataModule's validation loaders and ``CausalLM``'s own validation step.

    stagewise interpolate --from models/default/language_model_best.ckpt --to models/default/code_model_best.ckpt \\
        --alphas 0,0.25,0.5,0.75,1 --data_dir data --domains language,code --out models/default/code_wise.ckpt
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
from jsonargparse import ArgumentParser

from datamodules.datamodule import CorpusDataModule
from datamodules.errors import StagewiseError, TokenizerMismatchError
from datamodules.metric_names import val_loss
from datamodules.stage_record import (
    checkpoint_mismatch, file_sha256, lineage_domains, read_checkpoint, stage_record_for_checkpoint,
)
from lightning_modules.causal_lm import CausalLM
from lightning_modules.stage import data_section


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A Lightning checkpoint as a dict (StagewiseError when missing or not a Lightning checkpoint)."""
    return read_checkpoint(path, "train that stage first or fix the path")


def check_compatible(parent: dict, child: dict, parent_path: str = "parent", child_path: str = "child") -> None:
    """Raise unless both checkpoints hold the same tensors (names and shapes) and the same tokenizer."""
    ours, theirs = parent["state_dict"], child["state_dict"]
    if set(ours) != set(theirs):
        diff = sorted(set(ours) ^ set(theirs))
        raise StagewiseError(f"{parent_path} and {child_path} hold different tensors (e.g. {diff[:3]}); "
                             "only checkpoints of one architecture and size can be blended")
    for name, tensor in ours.items():
        if tensor.shape != theirs[name].shape:
            raise StagewiseError(f"'{name}' is {tuple(tensor.shape)} in {parent_path} but "
                                 f"{tuple(theirs[name].shape)} in {child_path}; blend checkpoints of one model size")
    tok = [(c.get("hyper_parameters") or {}).get("tokenizer_sha256") for c in (parent, child)]
    if tok[0] and tok[1] and tok[0] != tok[1]:
        raise TokenizerMismatchError(f"{parent_path} uses tokenizer {tok[0][:12]}… but {child_path} uses "
                                     f"{tok[1][:12]}…; blend checkpoints of one lineage")


def lineage_problems(parent: str | Path, child: str | Path) -> list[str]:
    """Why ``child`` is not known to descend from ``parent``: its record names another parent file (or the
    parent was retrained since), or a record describes other weights than its file. Empty when the records
    agree with the files (or there are none)."""
    problems = []
    for path in (parent, child):
        record = stage_record_for_checkpoint(path)
        mismatch = record and checkpoint_mismatch(record, path)
        if mismatch:
            problems.append(mismatch)
    recorded = (stage_record_for_checkpoint(child) or {}).get("parent") or {}
    if recorded.get("sha256") and recorded["sha256"] != file_sha256(parent):
        problems.append(f"{child} was trained from {recorded.get('path')} (sha256 {recorded['sha256'][:12]}…), but "
                        f"--from {parent} has sha256 {file_sha256(parent)[:12]}…: not its parent (anymore)")
    return problems


def blend(parent: dict[str, torch.Tensor], child: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """``(1-alpha)·parent + alpha·child`` for floating-point tensors (computed in float32, stored in the
    child's dtype); other tensors (integer buffers) are the child's."""
    out = {}
    for name, c in child.items():
        if c.is_floating_point():
            if alpha == 0 or alpha == 1:  # exact endpoints, whatever the dtype
                out[name] = (parent[name] if alpha == 0 else c).to(c.dtype).clone()
            else:
                out[name] = torch.lerp(parent[name].float(), c.float(), alpha).to(c.dtype)
        else:
            out[name] = c.clone()
    return out


def evaluate(model: L.LightningModule, datamodule: L.LightningDataModule, accelerator: str = "auto") -> dict[str, float]:
    """Per-domain held-out losses of ``model``: ``Trainer.validate`` with the DataModule's loaders and
    the model's own validation step, read from ``val/<domain>/loss``."""
    trainer = L.Trainer(accelerator=accelerator, devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.validate(model, datamodule=datamodule, verbose=False)
    return {d: float(trainer.callback_metrics[val_loss(d)]) for d in datamodule.val_domains}


def choose_alpha(results: list[dict[str, Any]], choose: str = "best_mean") -> float:
    """The α to keep, after adding each result's ``relative_mean``: the mean over domains of
    loss / (that domain's best loss over all α). ``best_mean``: the α with the lowest one;
    ``"language=2,code=1"``: the lowest weighted mean; a number: that α."""
    domains = list(results[0]["losses"])
    weights = {d: 1.0 for d in domains}
    fixed = None
    if choose != "best_mean":
        try:
            fixed = float(choose)
        except ValueError:
            try:
                weights = {k.strip(): float(v) for k, v in (item.split("=") for item in choose.split(","))}
            except ValueError:
                raise StagewiseError(f"--choose {choose!r}: use 'best_mean', an alpha, or weights like "
                                     f"'{domains[0]}=1,{domains[-1]}=1'") from None
            if set(weights) - set(domains):
                raise StagewiseError(f"--choose: unknown domains {sorted(set(weights) - set(domains))}; "
                                     f"evaluated: {domains}")
    best = {d: min(r["losses"][d] for r in results) for d in domains}
    for r in results:
        r["relative_mean"] = sum(w * r["losses"][d] / best[d] for d, w in weights.items()) / sum(weights.values())
    if fixed is None:
        return min(results, key=lambda r: r["relative_mean"])["alpha"]
    if fixed not in [r["alpha"] for r in results]:
        raise StagewiseError(f"--choose {choose}: not among --alphas {[r['alpha'] for r in results]}")
    return fixed


def interpolate(
    parent: str,
    child: str,
    datamodule: L.LightningDataModule,
    alphas: list[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
    choose: str = "best_mean",
    out: str | None = None,
    report: str | None = None,
    accelerator: str = "auto",
) -> dict[str, Any]:
    """Blend, evaluate every α, write the report (JSON) and the chosen blend (``out``); return the report.
    A child that does not descend from ``parent`` (by the stage records' sha256) is said so, in the report's
    ``lineage`` and on stderr, and still blended."""
    p_ckpt, c_ckpt = load_checkpoint(parent), load_checkpoint(child)
    check_compatible(p_ckpt, c_ckpt, parent, child)
    broken = lineage_problems(parent, child)
    for problem in broken:
        print(f"stagewise interpolate: lineage broken: {problem}", file=sys.stderr)
    data_tok = getattr(datamodule, "tokenizer_sha256", None)
    model_tok = (c_ckpt.get("hyper_parameters") or {}).get("tokenizer_sha256")
    if data_tok and model_tok and data_tok != model_tok:
        raise TokenizerMismatchError(f"{child} uses tokenizer {model_tok[:12]}… but the data in "
                                     f"{getattr(datamodule, 'data_dir', '?')} was made with {data_tok[:12]}…")
    model = CausalLM.load_from_checkpoint(child, map_location="cpu")
    results = []
    for alpha in alphas:
        model.load_state_dict(blend(p_ckpt["state_dict"], c_ckpt["state_dict"], alpha))
        results.append({"alpha": float(alpha), "losses": evaluate(model, datamodule, accelerator)})
    chosen = choose_alpha(results, choose)
    summary = {"parent": str(parent), "child": str(child), "choose": choose, "chosen_alpha": chosen,
               "results": results, "out": out, "lineage": broken or "checked: the child's record names this parent"}
    print_table(summary)
    report = Path(report or Path(child).with_name(Path(child).stem + "_interpolation.json"))
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(json.dumps(summary, indent=2) + "\n")
    if out:
        save_blend(c_ckpt, blend(p_ckpt["state_dict"], c_ckpt["state_dict"], chosen), out,
                   {"parent": str(parent), "child": str(child), "alpha": chosen})
    return summary


def save_blend(child_ckpt: dict, state_dict: dict[str, torch.Tensor], out: str | Path, meta: dict) -> None:
    """Write a checkpoint in the child's format (hyper_parameters, lineage kept) holding ``state_dict``.
    Optimizer and scheduler states are left out: they belong to the child's weights, so the blend is a
    start for ``init_from`` or evaluation, not a run to resume."""
    skip = {"state_dict", "optimizer_states", "lr_schedulers", "callbacks", "loops"}
    ckpt = {k: v for k, v in child_ckpt.items() if k not in skip}
    ckpt["state_dict"] = state_dict
    ckpt["interpolation"] = meta
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    torch.save(ckpt, tmp)
    tmp.replace(out)


def print_table(summary: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    results = summary["results"]
    domains = list(results[0]["losses"])
    table = Table(title=f"(1-α)·{Path(summary['parent']).name} + α·{Path(summary['child']).name}")
    for col in ["α", *(val_loss(d) for d in domains), "relative mean", ""]:
        table.add_column(col, justify="right")
    for r in results:
        rel = f"{r['relative_mean']:.4f}" if "relative_mean" in r else ""
        mark = "← chosen" if r["alpha"] == summary["chosen_alpha"] else ""
        table.add_row(f"{r['alpha']:g}", *(f"{r['losses'][d]:.4f}" for d in domains), rel, mark)
    Console().print(table)


def build_datamodule(config: str | None, data_dir: str | None, domains: list[str] | None,
                     max_windows: int | None, batch_size: int | None, seq_len: int | None,
                     lineage: list[str] | None = None) -> L.LightningDataModule:
    """The validation data: a stage config's ``data`` section as ``stagewise fit`` composes it, or a data dir
    with ``--domains``; explicit flags override the config's values. The domains: ``domains``, else the
    config's ``val_domains``, else ``lineage`` (the child's), else the stage's own."""
    overrides = {k: v for k, v in {"data_dir": data_dir, "val_max_windows": max_windows,
                                   "batch_size": batch_size, "seq_len": seq_len}.items() if v is not None}
    if config and Path(config).is_file():
        section = data_section(config)
        if not section.get("class_path"):
            raise StagewiseError(f"{config} has no data: class_path section; pass a stage config or a data dir")
        module, _, name = section["class_path"].rpartition(".")
        cls = getattr(importlib.import_module(module), name)
        init = {**section["init_args"], **overrides}
        dm = cls(**init)
        dm.val_domains = list(domains or init.get("val_domains") or lineage or dm.val_domains)
        return dm
    if config:  # a data dir
        overrides.setdefault("data_dir", config)
    domains = domains or lineage
    if not domains:
        raise StagewiseError("name the domains to evaluate with --domains language,code (or pass -c <stage config>)")
    return CorpusDataModule(corpus=domains[0], val_domains=list(domains), **overrides)


def _csv(kind):
    return lambda s: [kind(x) for x in (s.split(",") if isinstance(s, str) else s)]


def main(args: list[str] | None = None) -> dict[str, Any]:
    """``stagewise interpolate``: parse the arguments and run :func:`interpolate`."""
    parser = ArgumentParser(prog="stagewise interpolate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--from", dest="parent", type=str, required=True, help="The parent checkpoint (α=0).")
    parser.add_argument("--to", dest="child", type=str, required=True, help="The child checkpoint (α=1).")
    parser.add_argument("--alphas", type=_csv(float), default=[0.0, 0.25, 0.5, 0.75, 1.0],
                        help="Blend weights of the child, comma-separated.")
    parser.add_argument("-c", "--data", type=str, default=None,
                        help="A stage config (its data: section is used) or a prepared data dir.")
    parser.add_argument("--data_dir", type=str, default=None, help="Prepared data dir (overrides the config's).")
    parser.add_argument("--domains", type=_csv(str), default=None,
                        help="Validation domains, comma-separated (default: the stage config's, else the child's lineage).")
    parser.add_argument("--max_windows", type=int, default=None, help="Validation windows per domain.")
    parser.add_argument("--batch_size", type=int, default=None, help="Validation batch size.")
    parser.add_argument("--seq_len", type=int, default=None, help="Tokens per validation window.")
    parser.add_argument("--choose", type=str, default="best_mean",
                        help="'best_mean', weights like 'language=1,code=2', or an alpha.")
    parser.add_argument("--out", type=str, default=None, help="Write the chosen blend to this checkpoint.")
    parser.add_argument("--report", type=str, default=None,
                        help="JSON report path (default: <child>_interpolation.json beside the child).")
    parser.add_argument("--accelerator", type=str, default="auto", help="Lightning accelerator.")
    cfg = parser.parse_args(args)
    lineage = lineage_domains(stage_record_for_checkpoint(cfg.child))
    dm = build_datamodule(cfg.data, cfg.data_dir, cfg.domains, cfg.max_windows, cfg.batch_size, cfg.seq_len, lineage)
    return interpolate(cfg.parent, cfg.child, dm, cfg.alphas, cfg.choose, cfg.out, cfg.report, cfg.accelerator)
