"""Datasets: ``tdbench data prepare`` (tokenize and pack into the block cache) and ``data list``."""
from __future__ import annotations

from bench.data import catalog


def cmd_data(args) -> int:
    if args.data_cmd == "list":
        for row in catalog.listing():
            print(f"{row['name']:12s} {row['kind']:9s} {row['source']}  [splits: {row['splits']}]")
            for c in row["cached"]:
                print(f"    cached {c['split']:5s} {c['tokenizer']:10s} L={c['seq_len']:<5d} {c['packing']:17s} "
                      f"{c['n_tokens']:>12,} tokens {c['n_blocks']:>9,} blocks  ({c['dataset']})")
        return 0
    rows = catalog.prepare(args.name, args.path, args.tokenizer, args.seq_len, args.protocol,
                           args.split, args.num_proc)
    for r in rows:
        how = (f"built in {r['build_s']:.1f} s ({r['tokens_per_s']:,} tokens/s, {r['num_proc']} worker(s))"
               if r["fresh"] else "already cached")
        print(f"{args.name}/{r['split']}: {r['n_docs']:,} documents, {r['n_tokens']:,} tokens, {r['blocks']:,} blocks "
              f"of {r['seq_len']} ({r['packing']}, {r['n_counted']:,} counted); {how}: {r['dir']}")
    return 0


def register(sub) -> None:
    da = sub.add_parser("data", help="prepare (cache) or list datasets")
    dsub = da.add_subparsers(dest="data_cmd", required=True)
    dp = dsub.add_parser("prepare", help="tokenize and pack a dataset into the block cache (progress bar)")
    dp.add_argument("name", help="a registered dataset (tdbench data list)")
    dp.add_argument("--path", help="a local copy laid out like the hub's (directory or file)")
    dp.add_argument("--tokenizer", choices=["gpt2", "char"], help="default: gpt2 (char for text8)")
    dp.add_argument("--seq-len", type=int, help="block length (default 1024; 256 for text8)")
    dp.add_argument("--protocol", help="sedd (default), mdlm, no-specials, or none (no EOS; text8)")
    dp.add_argument("--split", action="append", help="only this split (repeatable; default: all the dataset has)")
    dp.add_argument("--num-proc", type=int, help="tokenisation workers (default: by size, up to all cores)")
    dp.set_defaults(fn=cmd_data)
    dl = dsub.add_parser("list", help="registered datasets, where they come from, what is cached")
    dl.set_defaults(fn=cmd_data)
