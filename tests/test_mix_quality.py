"""Quality pruning at the default thresholds: junk injected into a real pool (random
characters, navigation boilerplate, repeated lines) ends up in pruned clusters, and the
cluster report lists those clusters with examples."""

import json
import random
import string

import numpy as np

from forgetless.config import load_config
from forgetless.mix.quality import heuristic_score, rules_score

NAVIGATION = (
    "home about contact privacy policy terms login register cart sitemap cookies newsletter "
    "subscribe share facebook twitter menu search faq careers"
).split()
SPAM = (
    "Buy cheap watches online now",
    "Click here for the best deals",
    "Best casino bonus free spins today",
    "Lose weight fast with this one trick",
)


def junk_documents(count: int, seed: int = 0) -> list[str]:
    """Three kinds of junk in turn: random characters, navigation boilerplate, one line
    repeated."""
    rng = random.Random(seed)
    alphabet = string.ascii_letters + string.digits + string.punctuation
    documents = []
    for index in range(count):
        if index % 3 == 0:
            words = (
                "".join(rng.choice(alphabet) for _ in range(rng.randint(2, 12)))
                for _ in range(rng.randint(60, 150))
            )
            documents.append(" ".join(words))
        elif index % 3 == 1:
            links = (rng.choice(NAVIGATION).title() for _ in range(rng.randint(40, 90)))
            documents.append(" | ".join(links) + " © 2024 All rights reserved.")
        else:
            documents.append("\n".join([rng.choice(SPAM)] * rng.randint(20, 60)))
    return documents


def test_rules_fail_every_kind_of_junk_that_the_averaged_heuristic_passes():
    junk = junk_documents(30)
    assert max(rules_score(text) for text in junk) == 0.0
    # The averaged heuristic passes all three kinds at its 0.5 threshold: why rules is default.
    assert min(heuristic_score(text) for text in junk) > 0.5
    prose = (
        "The committee reviewed the proposal in detail and asked the authors to clarify how "
        "the trial participants were recruited and which outcomes were chosen in advance."
    )
    assert rules_score(prose) == 1.0
    # A headline has no room for stop words, and is not junk for lacking them.
    assert rules_score("Nvidia shares jump after record quarterly data-center revenue.") == 1.0


def test_injected_junk_lands_in_pruned_clusters(tmp_path, shared_data_dir):
    from forgetless.mix import run_clustering
    from forgetless.mix.corpus import load_corpus
    from forgetless.mix.stages import load_groups

    junk = tmp_path / "junk.jsonl"
    junk.write_text("".join(json.dumps({"text": text}) + "\n" for text in junk_documents(30)))
    sources = ["c4", "pubmedqa@train", "nwgi@test", str(junk)]
    config = load_config(
        None,
        {
            "mix.sources": sources,
            "mix.limit_per_source": 40,
            # A small pool: ten documents a cluster gives k = 15 (the default 50 gives 3).
            "mix.cluster.docs_per_cluster": 10,
        },
    )
    assert config.mix.quality.thresholds == {"rules": 0.5}
    results = run_clustering(config, tmp_path / "run", progress=False)
    directory = results["clusters"].directory
    groups = load_groups(directory)
    corpus = load_corpus(sources, 40, None)
    is_junk = np.array([source == str(junk) for source in corpus.sources])
    assert results["clusters"].summary["clusters"] == 150 // 10
    assert (groups[is_junk] == -1).all()
    assert (groups[~is_junk] >= 0).mean() > 0.9
    report = json.loads((directory / "report.json").read_text())
    assert report["k_rule"] == "k = 15: auto, 150 documents // 10 per cluster"
    pruned = report["pruned_clusters"]
    assert all(cluster["scores"]["rules"] < 0.5 and cluster["examples"] for cluster in pruned)
    # Nearly all the junk goes with whole clusters; a page that k-means put among good ones
    # leaves its cluster's mean high and is dropped on its own score instead.
    in_pruned = sum(cluster["sources"].get(str(junk), 0) for cluster in pruned)
    assert in_pruned >= 27 and in_pruned + report["dropped_documents"] >= 30
    markdown = (directory / "report.md").read_text()
    table = markdown.split("## Pruned clusters")[1]
    assert sum(line.startswith("| ") for line in table.splitlines()) == 1 + len(pruned)
    assert any(line in table for line in SPAM)
    # Clusters alone (CLIMB's pruning) miss what was put among good documents. Same run
    # directory: the embeddings and scores are reused, only the clusters are redone.
    config.mix.quality.document_thresholds = {}
    alone = run_clustering(config, tmp_path / "run", progress=False)
    assert alone["embeddings"].cached and not alone["clusters"].cached
    groups = load_groups(alone["clusters"].directory)
    assert 0 < (groups[is_junk] >= 0).sum() <= 3
