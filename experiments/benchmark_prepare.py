"""How fast the data path is: `stagewise prepare` against cores, tokenization MB/s, train-loader tokens/s.

    python experiments/benchmark_prepare.py                    # builds its own shards from the CPython stdlib
    python experiments/benchmark_prepare.py --data-dir data    # uses `stagewise prepare`'s tokenizer and shards
    python experiments/benchmark_prepare.py --prepare configs/data/full.yaml --workers 1 2 --max-documents 400

`--prepare`: the whole `stagewise prepare` of a data config (read and clean every source, deduplicate, split,
tokenize, write shards) into a fresh data dir with fresh caches, once per `--workers` value, each run its own
process with the tokenizer's threads limited to the same number of cores (RAYON_NUM_THREADS). The tokenizer
is copied from `--tokenizer` (default: the config's data_dir/tokenizer) so BPE training, which is not what
scales, is left out. `--max-documents N` cuts every source to its first N documents (the whole config when
0). Reports documents/s and tokens/s per core count, with the machine and the commit, and writes
experiments/results/benchmark_prepare_<config>.json and .md.

Tokenization: real source files (the CPython stdlib, as in the code corpus) encoded in batches of 256
documents, as `stagewise prepare` does. Loader: the train DataLoader of `CorpusDataModule` in one process
(num_workers=0), batch 8 x seq 1024, iterated over whole epochs; the goal is >= 5M tokens/s, far above what
a GPU trains on. Prints a table and writes experiments/results/benchmark_prepare.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datamodules.datamodule import CorpusDataModule  # noqa: E402
from datamodules.shards import ShardWriter, write_manifest  # noqa: E402
from datamodules.tokenizer import encode_document, load_tokenizer, tokenizer_sha256, train_tokenizer  # noqa: E402


def stdlib_texts(max_bytes: int) -> list[str]:
    """Python files of the stdlib (tests included), sorted, up to ``max_bytes`` of UTF-8."""
    texts, total = [], 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        texts.append(text)
        total += len(text.encode())
        if total >= max_bytes:
            break
    return texts


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{platform.node()}: {cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}"


def commit() -> str:
    """The checked-out commit, with ``+dirty`` when tracked files differ from it."""
    repo = Path(__file__).resolve().parents[1]
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "-uno"], cwd=repo, capture_output=True, text=True).stdout
    except OSError:
        return "unknown"
    return sha + ("+dirty" if dirty.strip() else "")


def prepare_once(config: str, workers: int, max_documents: int, tokenizer: str, out: str,
                 corpora: list[str] | None = None) -> dict:
    """One timed `prepare` of ``config`` into a fresh temporary data dir (run in its own process)."""
    import yaml

    import datamodules.prepare as prepare_mod
    from datamodules.prepare import main as prepare_main

    cfg = yaml.safe_load(Path(config).read_text())
    with tempfile.TemporaryDirectory(prefix="bench-prepare-") as tmp:
        cfg["data_dir"] = tmp
        cfg.pop("cache_dir", None)
        cfg["tokenizer"] = {**cfg.get("tokenizer", {}), "from_dir": tokenizer}
        if corpora:
            cfg["corpora"] = {name: c for name, c in cfg["corpora"].items() if name in corpora}
        if max_documents:
            for corpus in cfg["corpora"].values():
                for source in corpus["sources"]:
                    source.setdefault("init_args", {})["max_documents"] = max_documents
        path = Path(tmp) / "config.yaml"
        path.write_text(yaml.safe_dump(cfg))
        read_seconds = 0.0
        real_read = prepare_mod._read_source

        def timed_read(*args, **kwargs):
            nonlocal read_seconds
            start = time.perf_counter()
            try:
                return real_read(*args, **kwargs)
            finally:
                read_seconds += time.perf_counter() - start

        prepare_mod._read_source = timed_read
        load_before = os.getloadavg()[0]
        start = time.perf_counter()
        prepare_main(["-c", str(path), "--workers", str(workers)])
        seconds = time.perf_counter() - start
        manifests = {p.parent.name: json.loads(p.read_text()) for p in Path(tmp).glob("*/manifest.json")}
    documents = sum(sum(m["documents"].values()) for m in manifests.values())
    tokens = sum(sum(m["tokens"].values()) for m in manifests.values())
    result = {"workers": workers, "load_average_before": round(load_before, 2), "seconds": round(seconds, 1), "read_seconds": round(read_seconds, 1),
              "documents": documents, "tokens": tokens, "documents_per_s": round(documents / seconds, 1),
              "tokens_per_s": round(tokens / seconds), "read_documents_per_s": round(documents / read_seconds, 1),
              "tokenize_tokens_per_s": round(tokens / max(1e-9, seconds - read_seconds)),
              "per_corpus": {n: {"documents": sum(m["documents"].values()), "tokens": sum(m["tokens"].values())}
                             for n, m in manifests.items()}}
    Path(out).write_text(json.dumps(result))
    return result


def bench_prepare(args) -> None:
    import yaml

    cfg = yaml.safe_load(Path(args.prepare).read_text())
    tokenizer = args.tokenizer or str(Path(cfg.get("data_dir", "data")) / "tokenizer")
    result = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "machine": machine(),
              "commit": commit(), "command": shlex.join([Path(sys.executable).name, *sys.argv]),
              "config": args.prepare, "corpora": args.corpora or "all", "max_documents_per_source": args.max_documents or None,
              "tokenizer": tokenizer, "runs": []}
    for workers in args.workers:
        with tempfile.NamedTemporaryFile(suffix=".json") as out:
            env = dict(os.environ, RAYON_NUM_THREADS=str(workers), TOKENIZERS_PARALLELISM="true")
            subprocess.run([sys.executable, __file__, "--prepare", args.prepare, "--one", str(workers),
                            "--max-documents", str(args.max_documents), "--tokenizer", tokenizer, "--out", out.name,
                            *(["--corpora", *args.corpora] if args.corpora else [])], env=env, check=True)
            run = json.loads(Path(out.name).read_text())
        result["runs"].append(run)
        print(f"{workers} worker(s): {run['documents']:,} documents, {run['tokens']:,} tokens in {run['seconds']} s "
              f"({run['documents_per_s']} documents/s, {run['tokens_per_s']:,} tokens/s; reading {run['read_seconds']} s)")
    name = Path(args.prepare).stem + ("_" + "_".join(args.corpora) if args.corpora else "")
    out = Path(args.out if args.out != DEFAULT_OUT else f"experiments/results/benchmark_prepare_{name}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    rows = ["| workers (cores) | load average before | documents | tokens | wall s | read s | documents/s | tokens/s |",
            "|---|---|---|---|---|---|---|---|"]
    rows += [f"| {r['workers']} | {r.get('load_average_before', '–')} | {r['documents']:,} | {r['tokens']:,} | {r['seconds']} | "
             f"{r['read_seconds']} | {r['documents_per_s']} | {r['tokens_per_s']:,} |" for r in result["runs"]]
    out.with_suffix(".md").write_text(
        f"# `stagewise prepare` against cores: {args.prepare}\n\n{result['date']}, commit {result['commit']}, "
        f"{result['machine']}\n\n`{result['command']}`; corpora: {result['corpora']}; every source cut to its first "
        f"{args.max_documents or 'all'} documents; tokenizer copied from {tokenizer} (no BPE training).\n\n"
        + "\n".join(rows) + "\n")
    print(f"wrote {out} and {out.with_suffix('.md')}")


def bench_tokenize(tok, texts: list[str], batch: int = 256) -> dict:
    encode_document(tok, texts[:batch])  # warm up the backend copy
    start = time.perf_counter()
    tokens = 0
    for i in range(0, len(texts), batch):
        tokens += sum(len(ids) for ids in encode_document(tok, texts[i : i + batch]))
    seconds = time.perf_counter() - start
    mb = sum(len(t.encode()) for t in texts) / 1e6
    return {"documents": len(texts), "mb": round(mb, 2), "tokens": tokens, "seconds": round(seconds, 3),
            "mb_per_s": round(mb / seconds, 2), "tokens_per_s": round(tokens / seconds),
            "bytes_per_token": round(mb * 1e6 / tokens, 2)}


def build_shards(tok, tok_dir: Path, texts: list[str], root: Path, corpus: str) -> None:
    sha = tokenizer_sha256(tok_dir)
    dtype = "uint16" if len(tok) <= 65535 else "uint32"
    counts = {}
    for split, docs in (("train", texts[20:]), ("val", texts[:10]), ("test", texts[10:20])):
        with ShardWriter(root / corpus, split, dtype) as w:
            for ids in encode_document(tok, docs):
                w.add(ids)
        counts[split] = w.tokens
    write_manifest(root / corpus, {"corpus": corpus, "kind": "text", "dtype": dtype, "tokens": counts,
                                   "tokenizer_sha256": sha, "tokenizer_dir": str(tok_dir)})


def bench_loader(data_dir: Path, corpus: str, seq_len: int, batch_size: int, min_seconds: float) -> dict:
    dm = CorpusDataModule(corpus, data_dir=str(data_dir), seq_len=seq_len, batch_size=batch_size, num_workers=0)
    loader = dm.train_dataloader()
    next(iter(loader))  # open the memmap, warm the page cache
    batches, epoch, start = 0, 0, time.perf_counter()
    while time.perf_counter() - start < min_seconds:
        loader.sampler.set_epoch(epoch)
        for batch in loader:
            batches += 1
        epoch += 1
    seconds = time.perf_counter() - start
    tokens = batches * batch_size * seq_len
    return {"corpus": corpus, "train_windows": len(loader.dataset),
            "batch_size": batch_size, "seq_len": seq_len, "num_workers": 0, "epochs": epoch, "batches": batches,
            "seconds": round(seconds, 3), "tokens_per_s": round(tokens / seconds),
            "batches_per_s": round(batches / seconds, 1), "goal_tokens_per_s": 5_000_000,
            "meets_goal": tokens / seconds >= 5_000_000}


DEFAULT_OUT = "experiments/results/benchmark_prepare.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", help="prepared data (tokenizer/ and <corpus>/); default: build from the stdlib")
    parser.add_argument("--corpus", default="code", help="corpus of --data-dir whose train loader to time")
    parser.add_argument("--sample-mb", type=float, default=32.0, help="MB of stdlib source to tokenize")
    parser.add_argument("--vocab-size", type=int, default=8192, help="vocabulary of the tokenizer trained here")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--loader-seconds", type=float, default=5.0, help="time the loader for at least this long")
    parser.add_argument("--out", default=DEFAULT_OUT)
    parser.add_argument("--prepare", help="a data config: time `stagewise prepare` of it against --workers")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, os.cpu_count() or 1])
    parser.add_argument("--max-documents", type=int, default=0, help="cut every source to this many documents")
    parser.add_argument("--tokenizer", help="tokenizer directory to copy (default: the config's data_dir/tokenizer)")
    parser.add_argument("--corpora", nargs="+", help="only these corpora of the config (default: all)")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # one timed run, in a child process
    args = parser.parse_args()
    if args.prepare and args.one:
        prepare_once(args.prepare, args.one, args.max_documents, args.tokenizer, args.out, args.corpora)
        return
    if args.prepare:
        bench_prepare(args)
        return

    texts = stdlib_texts(int(args.sample_mb * 1e6))
    result = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "machine": machine(),
              "command": shlex.join([Path(sys.executable).name, *sys.argv])}
    with tempfile.TemporaryDirectory() as tmp:
        prepared = args.data_dir and (Path(args.data_dir) / args.corpus / "manifest.json").exists()
        if prepared:
            data_dir = Path(args.data_dir)
            tok_dir = data_dir / "tokenizer"
            tok = load_tokenizer(tok_dir)
            result["tokenizer"] = {"source": str(tok_dir), "vocab": len(tok)}
        else:
            data_dir, tok_dir = Path(tmp), Path(tmp) / "tokenizer"
            start = time.perf_counter()
            tok = train_tokenizer(texts, args.vocab_size, tok_dir)
            seconds = time.perf_counter() - start
            result["tokenizer"] = {"source": "trained here on the stdlib sample", "vocab": len(tok),
                                   "train_mb": round(sum(len(t.encode()) for t in texts) / 1e6, 2),
                                   "train_seconds": round(seconds, 2)}
        result["tokenize"] = bench_tokenize(tok, texts)
        if not prepared:
            build_shards(tok, tok_dir, texts, data_dir, args.corpus)
        result["loader"] = bench_loader(data_dir, args.corpus, args.seq_len, args.batch_size, args.loader_seconds)
        result["loader"]["shards"] = str(Path(args.data_dir) / args.corpus) if prepared else "temporary, from the stdlib"

    t, lo = result["tokenize"], result["loader"]
    rows = [
        ("tokenizer", f"vocab {result['tokenizer']['vocab']}, {result['tokenizer']['source']}"),
        ("tokenize (encode_document, batch 256)",
         f"{t['mb_per_s']} MB/s, {t['tokens_per_s']:,} tokens/s ({t['mb']} MB, {t['bytes_per_token']} bytes/token)"),
        (f"train loader ({lo['batch_size']} x {lo['seq_len']}, 0 workers)",
         f"{lo['tokens_per_s']:,} tokens/s ({lo['batches_per_s']} batches/s; goal 5M: "
         f"{'met' if lo['meets_goal'] else 'NOT met'})"),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"{result['machine']}\n{result['date']}")
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
