"""How fast the data path is: tokenization MB/s through `encode_document`, and train-loader tokens/s.

    python experiments/benchmark_prepare.py                    # builds its own shards from the CPython stdlib
    python experiments/benchmark_prepare.py --data-dir data    # uses `stagewise prepare`'s tokenizer and shards

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", help="prepared data (tokenizer/ and <corpus>/); default: build from the stdlib")
    parser.add_argument("--corpus", default="code", help="corpus of --data-dir whose train loader to time")
    parser.add_argument("--sample-mb", type=float, default=32.0, help="MB of stdlib source to tokenize")
    parser.add_argument("--vocab-size", type=int, default=8192, help="vocabulary of the tokenizer trained here")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--loader-seconds", type=float, default=5.0, help="time the loader for at least this long")
    parser.add_argument("--out", default="experiments/results/benchmark_prepare.json")
    args = parser.parse_args()

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
