"""Small local copies of the public benchmarks, laid out like their Hugging Face hub
repositories (parquet shards under the config's directory, split-named files), with lines
shaped like the real data (word-level tokenisation, @-@ separators, <unk>, N, curly quotes).
Used by tests/test_hub_data.py: the loading code is the real one, only the files are small."""
from __future__ import annotations

import json
from pathlib import Path

WIKITEXT_ROWS = [
    "",
    " = Valkyria Chronicles III = \n",
    "",
    " Senjō no Valkyria 3 : Unrecorded Chronicles ( Japanese : 戦場のヴァルキュリア3 , lit . Valkyria of the "
    "Battlefield 3 ) , commonly referred to as Valkyria Chronicles III outside Japan , is a tactical role @-@ "
    "playing video game developed by Sega and Media.Vision for the PlayStation Portable . Released in January "
    "2011 in Japan , it is the third game in the Valkyria series . \n",
    " = = Gameplay = = \n",
    " The game 's battle system , the BliTZ system , is carried over directly from Valkyria Chronicles . It "
    "sold 1 @,@ 000 copies at $ 3 @.@ 5 each . \n",
    " = Tower Building of the Little Rock Arsenal = \n",
    "",
    " The Tower Building of the Little Rock Arsenal , also known as U.S. Arsenal Building , is a building "
    "located in MacArthur Park in downtown Little Rock , Arkansas . \n",
]
PTB_ROWS = [
    " aer banknote berlitz calloway centrust cluett fromstein gitano guterman hydro-quebec ipo kia memotec",
    " pierre <unk> N years old will join the board as a nonexecutive director nov. N",
    " mr. <unk> is chairman of <unk> n.v. the dutch publishing group",
    " it 's a N N \\/ N share of the company 's stock and they do n't expect $ N million",
]
LM1B_ROWS = [
    "While athletes in different professions dealt with doping scandals and other controversies , Woods "
    "continued to do what he did best : dominate the field of professional golf and rake in endorsements .",
    "Visit http : / / www.example.com for the \" full story \" ( in English ) .",
    "I 'm not sure it 's worth $ 5 , he said .",
    "Why not ?",
]
LAMBADA_ROWS = [
    "In my palm is a clear stone, and inside it is a small ivory statuette. A guardian angel.\n\n\u201cFigured if "
    "you\u2019re going to be out at night getting hit by cars, you might as well have some backup.\u201d\n\nI look "
    "at him, feeling stunned. Like this is some sort of sign. But as I stare at Harlin, his mouth curved in a "
    "confident grin, I don\u2019t care about signs",
    "Give me a minute to change and I\u2019ll meet you at the docks.\u201d She\u2019d forced those words through "
    "her teeth.\n\n\u201cNo need to change. We won\u2019t be that long.\u201d\n\nShane gripped her arm and started "
    "leading her to the dock",
]
OWT_ROWS = [f"Document {i} of the web crawl. It talks about topic number {i % 7} at some length.\n\nA second "
            f"paragraph of document {i}." for i in range(30)]
TEXT8 = ("anarchism originated as a term of abuse first used against early working class radicals including the "
         "diggers of the english revolution and the sans culottes of the french revolution ") * 20
ROC_ROWS = [f"Story {i}: Tom wanted a dog. He saved his money. He went to the shelter. He found a puppy. "
            f"Tom was happy." for i in range(12)]
WIKI_ROWS = [f"Article {i}\n\nArticle {i} is an encyclopedia entry about subject {i}. It has sections."
             for i in range(25)]
AG_ROWS = [f"Wall St. Bears Claw Back Into the Black (Reuters) Reuters - Short-sellers, story {i}, are seeing "
           f"green again." for i in range(12)]
# scientific_papers rows as the hub has them: word-tokenised, WikiText separators, spaced punctuation
SCI_ROWS = [f"the mean age of the {i} patients was 45 @.@ 2 years ( range 20 @-@ 70 ) . \n results : we found "
            f"that the rate of infection , as reported , was low ." for i in range(12)]


def _parquet(path: Path, column: str, rows: list[str], **more: list) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({column: rows, **more}), path)


def make(name: str, root: Path) -> Path:
    """Write a hub-shaped local copy of dataset ``name`` under ``root``; return the path to give."""
    root = Path(root) / name
    if name in ("wikitext2", "wikitext103"):
        cfg = {"wikitext2": "wikitext-2-raw-v1", "wikitext103": "wikitext-103-raw-v1"}[name]
        for split in ("train", "validation", "test"):
            _parquet(root / cfg / f"{split}-00000-of-00001.parquet", "text", WIKITEXT_ROWS)
        return root
    if name == "ptb":
        for split in ("train", "validation", "test"):
            _parquet(root / "penn_treebank" / f"{split}-00000-of-00001.parquet", "sentence", PTB_ROWS)
        return root
    if name in ("lm1b", "1bw"):
        for split in ("train", "test"):
            _parquet(root / "plain_text" / f"{split}-00000-of-00001.parquet", "text", LM1B_ROWS)
        return root
    if name == "lambada":  # OpenAI's own file: one JSON object per line
        root.mkdir(parents=True, exist_ok=True)
        f = root / "lambada_test.jsonl"
        f.write_text("".join(json.dumps({"text": t}) + "\n" for t in LAMBADA_ROWS))
        return f
    if name == "openwebtext":
        _parquet(root / "plain_text" / "train-00000-of-00002.parquet", "text", OWT_ROWS[:15])
        _parquet(root / "plain_text" / "train-00001-of-00002.parquet", "text", OWT_ROWS[15:])
        return root
    if name == "text8":  # the raw file: one line of 100M characters, no newline
        root.mkdir(parents=True, exist_ok=True)
        (root / "text8").write_text(TEXT8)
        return root / "text8"
    if name == "rocstories":
        import csv

        root.mkdir(parents=True, exist_ok=True)
        for split in ("train", "test"):
            with open(root / f"{split}.csv", "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["text"])
                w.writerows([[r] for r in ROC_ROWS])
        return root
    if name == "ag_news":  # fancyzhx/ag_news: data/{train,test}-*.parquet with text and label
        for split in ("train", "test"):
            _parquet(root / "data" / f"{split}-00000-of-00001.parquet", "text", AG_ROWS,
                     label=[i % 4 for i in range(12)])
        return root
    if name in ("pubmed", "arxiv"):  # armanc/scientific_papers: <config>/<split>-*.parquet
        for split in ("train", "validation", "test"):
            rows = SCI_ROWS if split != "test" else [f"hub test row {i} ." for i in range(12)]  # MDLM scores validation
            _parquet(root / name / f"{split}-00000-of-00001.parquet", "article", rows,
                     abstract=["an abstract ."] * len(SCI_ROWS), section_names=["introduction"] * len(SCI_ROWS))
        return root
    if name == "wikipedia":
        _parquet(root / "20231101.en" / "train-00000-of-00001.parquet", "text", WIKI_ROWS)
        return root
    raise KeyError(name)
