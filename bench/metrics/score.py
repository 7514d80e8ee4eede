"""Scoring samples: a sample set, a run directory, or a suite output directory.

``score_set`` computes every metric of one sample set in one :class:`ScoringSetup` (scorer, human
reference, memorization index, featurizer). ``score_run`` scores a run's ``samples.jsonl`` per
step budget plus the Source-text row and writes ``<run>/scores.json`` (values + resolved
settings + the samples' sha256); a second call on unchanged samples and settings reads it
back, and recomputing gives the same numbers (every step is deterministic on CPU). ``score_dir``
does it for every complete run of a suite output directory, finding each run's default scorer:
the complete ``ar`` run of the same size, seed and data there. MAUVE below its floor
(``metrics.mauve.min_samples`` per set) is recorded as value null with the reason, the
featurizer never loaded (bench.metrics.mauve says why). bench.metrics.scoreview shows a score
result as ``tdbench score`` prints it.
"""
from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench.config import DataConfig, DatasetRef, RunSpec
from bench.config_data import tokenizer_key
from bench.errors import UserError
from bench.infill import FILE as INFILL
from bench.metrics import FLOORS, MetricsConfig, floor_note
from bench.metrics.base import settings_id
from bench.metrics.genppl import gen_ppl, scorer_tokens
from bench.metrics.infill import score_infill
from bench.metrics.mauve import featurizer_settings
from bench.metrics.ngrams import diversity, mean_entropy, memorization, tokenize
from bench.metrics.reference import source_truth, true_set
from bench.records import JSON_ERRORS, read_record, write_json
from bench.samples import FILE, read_samples

SCORES = "scores.json"
SCORES_VERSION = 1
SELF_SCORED = "self-scored: the scorer is this run (gen_ppl = exp of its own sampling entropy rate)"


@dataclass
class ScoringSetup:
    cfg: MetricsConfig
    scorer: Any = None                     # a bench.metrics.scorers.Scorer, or None
    scorer_note: str | None = None         # why there is no scorer
    scorer_desc: str = "ar"                # what the settings record as the scorer
    view: tuple | None = None              # (tokenizer key, encode, eos id) when no scorer
    samples_tokenizer: str | None = None   # the tokenizer key the samples' ids are in
    reference: list[dict] | None = None    # MAUVE reference (human, held out)
    source: list[dict] | None = None       # Source-text set (human, held out, disjoint)
    ref_desc: dict | None = None
    ref_note: str | None = None
    mem_index: np.ndarray | None = None
    mem_corpus: str | None = None
    featurizer: Any = None                 # loaded on first need (a set at or above mauve.min_samples)
    notes: dict = field(default_factory=dict)
    truth: Any = None                      # a bench.metrics.truth.Truth: a synthetic source scores itself
    decode: Any = None                     # the samples' tokenizer's decode (infill texts, bench.metrics.infill)
    cache: dict = field(default_factory=dict)   # shared across runs: scorers, featurizer, indexes


def _tok_view(setup: ScoringSetup):
    if setup.scorer is not None:
        return setup.scorer.tokenizer_key, setup.scorer.encode, setup.scorer.eos_id
    return setup.view


def resolved_settings(setup: ScoringSetup, n: int) -> dict[str, dict]:
    c = setup.cfg
    tk = _tok_view(setup)[0] if _tok_view(setup) else None
    ident = getattr(setup.scorer, "identity", None)   # a named scorer's file and weights sha256
    out = {"gen_ppl": {**c.gen_ppl.model_dump(mode="json"), "scorer": setup.scorer_desc, "tokens": tk,
                       **({"scorer_model": ident} if ident else {})},
           "entropy": {"tokens": tk, "eos": c.gen_ppl.eos, "retokenize": c.gen_ppl.retokenize, "unit": "nats",
                       "over": "mean of per-sample unigram entropies"},
           "div": {"tokenization": c.ngrams.tokenization, "orders": list(c.ngrams.div_orders)},
           "mem": {"tokenization": c.ngrams.tokenization, "n": c.ngrams.mem_n, "corpus": setup.mem_corpus}}
    if c.mauve is not None and setup.truth is None:
        out["mauve"] = {**c.mauve.model_dump(mode="json"), "reference": setup.ref_desc, "n": n,
                        **featurizer_settings(c.mauve.featurizer)}
    if setup.truth is not None:   # in place of gen_ppl (and MAUVE): meaningless on a source's symbols
        out = {k: v for k, v in out.items() if k != "gen_ppl"} | setup.truth.settings(n)
    for v in out.values():
        v["id"] = settings_id(v)
    return out


def score_set(samples: list[dict], setup: ScoringSetup, self_scored: bool = False) -> dict:
    """{metric: {value, [std], id, [note]}} for one sample set."""
    n = len(samples)
    st = resolved_settings(setup, n)
    m: dict[str, dict] = {}
    view = _tok_view(setup)
    seqs = scorer_tokens(samples, view[0], view[1], view[2], setup.cfg.gen_ppl, setup.samples_tokenizer) \
        if view else None
    if setup.truth is not None:
        m.update(setup.truth.score(samples))
    elif setup.scorer is not None:
        m["gen_ppl"] = {"value": gen_ppl(seqs, setup.scorer, setup.cfg.gen_ppl)["value"]}
        if self_scored:
            m["gen_ppl"]["note"] = SELF_SCORED
    else:
        m["gen_ppl"] = {"value": None, "note": setup.scorer_note}
    m["entropy"] = {"value": mean_entropy(seqs) if seqs is not None else None}
    ws = [tokenize(s["text"], setup.cfg.ngrams.tokenization) for s in samples]
    m["div"] = {"value": diversity(ws, setup.cfg.ngrams.div_orders)}
    m["mem"] = ({"value": memorization(ws, setup.mem_index, setup.cfg.ngrams.mem_n)} if setup.mem_index is not None
                else {"value": None, "note": setup.notes.get("mem", "no training corpus to compare with")})
    if setup.cfg.mauve is not None and setup.truth is None:
        m["mauve"] = _mauve(samples, setup)
    for k, v in m.items():
        v["id"] = st[k]["id"]
    return {"n": n, "metrics": m, "settings": st}


def _mauve(samples: list[dict], setup: ScoringSetup) -> dict:
    """MAUVE of a set against the reference; None with the reason below ``min_samples`` per set
    (then the featurizer is not even loaded), without a reference or without the MAUVE stack."""
    st = setup.cfg.mauve
    if setup.reference is None:
        return {"value": None, "note": setup.ref_note}
    if min(len(samples), len(setup.reference)) < st.min_samples:
        return {"value": None, "note": floor_note("mauve", st.min_samples, FLOORS["mauve"][1])}
    if setup.featurizer is None:
        setup.featurizer = _featurizer(setup.cfg, setup.cache, setup)
    if setup.featurizer is None:
        return {"value": None, "note": setup.notes.get("mauve")}
    from bench.metrics.mauve import mauve_score
    p = setup.featurizer([s["text"] for s in samples])
    q = setup.featurizer([s["text"] for s in setup.reference])
    return mauve_score(p, q, st)


def budget_groups(samples: list[dict]) -> dict:
    out: dict = {}
    for s in samples:
        out.setdefault(s.get("steps"), []).append(s)
    return out


def score_samples(samples: list[dict], setup: ScoringSetup, self_scored: bool = False) -> dict:
    """Per step budget (+ NFE, samples/s when recorded) and the Source-text row."""
    budgets = []
    for steps, group in budget_groups(samples).items():
        b = {"steps": steps, **score_set(group, setup, self_scored)}
        if all("nfe" in s for s in group):
            b["nfe"] = float(np.mean([s["nfe"] for s in group]))
        if all(s.get("wall_s") for s in group):
            b["samples_per_s"] = float(1 / np.mean([s["wall_s"] for s in group]))
        budgets.append(b)
    out = {"budgets": budgets}
    if setup.cfg.source_text and setup.source is not None:
        out["source_text"] = score_set(setup.source, setup)
    return out


# ----------------------------------------------------------------------------- contexts
def _featurizer(cfg: MetricsConfig, cache: dict, setup: ScoringSetup):
    """The MAUVE featurizer (shared); None, with the reason in setup.notes, when the optional
    MAUVE stack is not installed (the other metrics are still computed)."""
    if cfg.mauve is None:
        return None
    key = ("feat", cfg.mauve.featurizer, cfg.mauve.max_text_length)
    if key not in cache:
        import importlib.util

        from bench.metrics.mauve import Featurizer
        missing = [m for m in ("mauve", "faiss") if importlib.util.find_spec(m) is None]
        if missing:
            cache[key] = "mauve: not installed (pip install 'tdbench[mauve]')"
        else:
            try:
                cache[key] = Featurizer(cfg.mauve.featurizer, cfg.mauve.max_text_length, cfg.mauve.batch_size)
            except UserError as e:
                cache[key] = str(e)
    if isinstance(cache[key], str):
        setup.notes["mauve"] = cache[key]
        return None
    return cache[key]


def _mem(setup: ScoringSetup, name: str, cache: dict):
    from bench.metrics.reference import train_index

    c = setup.cfg.ngrams
    key = ("mem", name, c.mem_n, c.tokenization)
    if key not in cache:
        cache[key] = train_index(name, c.mem_n, c.tokenization)
    setup.mem_index = cache[key]
    setup.mem_corpus = f"{name}:train" if cache[key] is not None else None
    if cache[key] is None:
        setup.notes["mem"] = f"{name} is not a text corpus"


def _human(setup: ScoringSetup, data: DataConfig, packing: str, ref: DatasetRef, n: int, cache: dict):
    from bench.metrics.reference import human_sets

    r = setup.cfg.reference
    key = ("human", data.model_dump_json(), packing, ref.key, r.split, n, r.seed, setup.cfg.source_text)
    if key not in cache:
        cache[key] = human_sets(data, packing, ref, r.split, n, r.seed, setup.cfg.source_text)
    setup.reference, src = cache[key]
    setup.source = src or None
    setup.ref_desc = {"dataset": ref.key, "split": r.split, "seed": r.seed, "seq_len": data.seq_len,
                    "tokenizer": tokenizer_key(data.tokenizer)}


def find_baseline(out: Path, spec: RunSpec) -> Path | None:
    """The complete ``ar`` run of the same size, seed and data in this output directory."""
    for p in sorted((Path(out) / "runs").glob("*/result.json")):
        try:
            r = read_record(p)
        except UserError:
            continue
        if r["status"] == "complete" and r["method"] == "ar" and r["size"] == spec.size and \
                r["seed"] == spec.seed and r["spec"]["data"] == spec.data.model_dump(mode="json"):
            return p.parent
    return None


def run_setup(run_dir: Path, spec: RunSpec, cfg: MetricsConfig, cache: dict) -> ScoringSetup:
    from bench.data import get_tokenizer

    setup = ScoringSetup(cfg=cfg, cache=cache)
    tok = get_tokenizer(spec.data)
    setup.samples_tokenizer = tok.key
    setup.view = (tok.key, tok.encode_batch, tok.eos_id if tok.eos_id >= 0 else None)
    setup.decode = tok.decode
    setup.truth = source_truth(spec, cfg)   # a synthetic source: scored by itself, no scorer, MAUVE or mem
    if setup.truth is not None:
        setup.notes["mem"] = f"{spec.data.train.name} is not a text corpus"
        return setup
    g = cfg.gen_ppl
    if g.scorer == "ar":
        base = find_baseline(run_dir.parent.parent, spec)
        setup.scorer_desc = "ar (the suite's matching-size AR baseline, same seed)"
        if base is None:
            setup.scorer_note = (f"no scorer: no complete 'ar' run of size {spec.size}, seed {spec.seed} "
                               f"in {run_dir.parent.parent}; give metrics.gen_ppl.scorer")
        else:
            key = ("scorer", str(base))
            if key not in cache:
                from bench.metrics.scorers import RunScorer
                cache[key] = RunScorer(base)
            setup.scorer = cache[key]
    else:
        key = ("scorer", g.scorer)
        if key not in cache:
            from bench.metrics.scorers import make_scorer
            cache[key] = make_scorer(g.scorer, g.stride)
        setup.scorer = cache[key]
        setup.scorer_desc = setup.scorer.key
    ref = DatasetRef(name=cfg.reference.dataset) if cfg.reference.dataset else spec.data.train
    _mem(setup, ref.name, cache)
    return setup


def samples_sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def score_run(run_dir: Path, cfg: MetricsConfig, cache: dict | None = None, write: bool = True,
              reuse: bool = True, log=None) -> dict | None:
    """Score ``run_dir/samples.jsonl``; None when the run has no samples."""
    cache = {} if cache is None else cache
    run_dir = Path(run_dir)
    path, fills = run_dir / FILE, run_dir / INFILL
    if not path.is_file() and not fills.is_file():
        return None
    rec = read_record(run_dir / "result.json")
    spec = RunSpec(**rec["spec"])
    old = read_scores(run_dir)
    setup = run_setup(run_dir, spec, cfg, cache)
    scorer_key = setup.scorer.key if setup.scorer is not None else None
    head = {"version": SCORES_VERSION, "samples_sha256": samples_sha(path) if path.is_file() else None,
            "config": cfg.model_dump(mode="json"), "scorer": scorer_key,
            **({"infill_sha256": samples_sha(fills)} if fills.is_file() else {})}
    if reuse and old and all(old.get(k) == v for k, v in head.items()):
        return old
    samples = read_samples(path) if path.is_file() else []
    n = max([len(g) for g in budget_groups(samples).values()] or [0])
    ref = DatasetRef(name=cfg.reference.dataset) if cfg.reference.dataset else spec.data.train
    try:
        if samples and setup.truth is None:
            _human(setup, spec.data, spec.eval.packing, ref, n, cache)
        elif samples:   # the Source row: fresh true blocks, as many (bench.metrics.truth)
            setup.source, setup.ref_desc = true_set(setup.truth, spec.data, n, cfg.reference.seed)
    except UserError as e:
        setup.ref_note = str(e)
    if log:
        log(f"scoring {rec['label']} {spec.size} seed={spec.seed}: {len(samples)} samples")
    self_scored = scorer_key is not None and setup.scorer.key == f"tdbench-ar:{spec.run_id}"
    res = {**head, "run_id": spec.run_id, "label": rec["label"], "size": spec.size, "seed": spec.seed,
           "scorer_run": scorer_key, "reference": setup.ref_desc,
           **(score_samples(samples, setup, self_scored) if samples else {"budgets": []})}
    if fills.is_file():   # eval.infill: the fills scored against the hidden text (bench.metrics.infill)
        res["infill"] = score_infill(fills, setup, rec.get("infill"), cfg.reference.seed)
    res = json.loads(json.dumps(res))      # exactly what a reader of the file sees
    if write:
        write_json(run_dir / SCORES, res)
    return res


def read_scores(run_dir: Path) -> dict | None:
    p = Path(run_dir) / SCORES
    try:
        return json.loads(p.read_text()) if p.is_file() else None
    except (OSError, *JSON_ERRORS):
        return None


def score_dir(out: Path, cfg: MetricsConfig, reuse: bool = True, log=None) -> dict[str, dict]:
    """Score every complete run with samples in a suite output directory."""
    cache: dict = {}
    res = {}
    recs = []
    for p in sorted((Path(out) / "runs").glob("*/result.json")):
        try:
            r = read_record(p)
        except UserError:
            continue
        if r["status"] == "complete" and ((p.parent / FILE).is_file() or (p.parent / INFILL).is_file()):
            recs.append((p.parent, r))
    for rd, r in recs:
        try:
            s = score_run(rd, cfg, cache, reuse=reuse, log=log)
        except UserError as e:
            print(f"error: scoring {rd.name}: {e}", file=sys.stderr)
            continue
        if s is not None:
            res[rd.name] = s
    return res


def metrics_config_of(out: Path) -> MetricsConfig:
    """The metric settings a suite output directory was scored with (``metrics.json``)."""
    p = Path(out) / "metrics.json"
    if not p.is_file():
        return MetricsConfig()
    try:
        return MetricsConfig(**json.loads(p.read_text()))
    except Exception as e:  # noqa: BLE001
        raise UserError(f"{p}: corrupt metric settings ({type(e).__name__}: {str(e).splitlines()[0]})") from None


# ----------------------------------------------------------------------------- any JSONL file
def file_setup(cfg: MetricsConfig, samples: list[dict], reference: str | None, cache: dict) -> ScoringSetup:
    """ScoringSetup for samples no run produced: scorer from ``cfg.gen_ppl.scorer`` ("ar" means none
    here), tokens in GPT-2's tokenization unless the scorer has its own, human sets from the
    ``reference`` dataset (GPT-2 blocks as long as the samples' median length)."""
    from bench.data import gpt2

    setup = ScoringSetup(cfg=cfg, cache=cache)
    g = cfg.gen_ppl
    if g.scorer == "ar":
        setup.scorer_note = "no scorer: give --scorer (a Hugging Face causal LM name/path or a tdbench ar run dir)"
        setup.scorer_desc = "none"
    else:
        from bench.metrics.scorers import make_scorer
        setup.scorer = make_scorer(g.scorer, g.stride)
        setup.scorer_desc = setup.scorer.key
    tok = gpt2()
    setup.view = (tok.key, tok.encode_batch, tok.eos_id)
    if reference is None:
        setup.ref_note = "no reference: give --reference DATASET"
        setup.notes["mem"] = "no reference: give --reference DATASET"
        return setup
    from bench.data import dataset_params
    ref = DatasetRef(name=reference)
    dataset_params(ref, "--reference")
    _mem(setup, reference, cache)
    lens = [len(x) for x in tok.encode_batch([s["text"] for s in samples])]
    L = max(4, int(np.median(lens)))
    data = DataConfig(train=ref, eval=[ref], tokenizer={"name": "gpt2"}, seq_len=L)
    try:
        _human(setup, data, "eos_per_doc", ref, len(samples), cache)
    except UserError as e:
        setup.ref_note = str(e)
    return setup


def score_file(path: Path, cfg: MetricsConfig, reference: str | None) -> dict:
    samples = read_samples(path)
    setup = file_setup(cfg, samples, reference, {})
    res = score_samples(samples, setup)
    return json.loads(json.dumps({"file": str(path), "scorer": setup.scorer_desc, "reference": setup.ref_desc, **res}))
