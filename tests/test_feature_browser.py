"""The feature browser: exact streaming statistics, the hierarchy statistic, and the page in Chromium."""

import json
import re

import pytest
import torch
from helpers import (
    TINY_SEQ_LEN,
    assert_rendered_without_errors,
    needs_chromium,
    rendered_dom,
    tiny_cfg,
    token_dataset,
)

from matryoshka_sae.activation_store import ActivationsStore, pack_documents
from matryoshka_sae.checkpoint import save_checkpoint
from matryoshka_sae.feature_browser import write_feature_browser
from matryoshka_sae.feature_statistics import (
    HISTOGRAM_BINS_PER_DECADE,
    HISTOGRAM_LOW_DECADE,
    N_HISTOGRAM_BINS,
    FeatureStatistics,
    FeatureStatisticsCollector,
    collect_feature_statistics,
    hierarchy_links,
    latent_groups,
)
from matryoshka_sae.sae import create_sae
from matryoshka_sae.transcoder_activation_store import (
    TranscoderActivationsStore,
    create_transcoder_config,
)

SEQ_LEN = TINY_SEQ_LEN  # the rows of tiny_cfg
TOP_N, CONTEXT = 6, 3
PAYLOAD = '<script>document.body.setAttribute("data-pwned","1")</script><img src=x onerror="document.body.setAttribute(\'data-pwned\',\'2\')">'


def trained_threshold_sae(cfg, store):
    """A random-weight SAE whose eval threshold is learned from one training batch."""
    sae = create_sae(cfg)
    batch = store.next_batch()
    sae(*batch) if isinstance(batch, tuple) else sae(batch)
    return sae


@pytest.fixture(scope="module")
def matryoshka_run(tiny_gpt2):
    cfg = tiny_cfg()
    store = ActivationsStore(tiny_gpt2, cfg)
    sae = trained_threshold_sae(cfg, store)
    stats = collect_feature_statistics(sae, store, top_n=TOP_N, context=CONTEXT)
    return cfg, store, sae, stats


# ---------------------------------------------------------------------------------------------
# Exactness against a brute force that keeps every activation
# ---------------------------------------------------------------------------------------------


def brute_force_code(sae, store):
    """Every activation [rows * seq_len, S] (0 at BOS) of the store's held-out rows."""
    tokens = store.get_eval_tokens()
    sae.eval()
    with torch.no_grad():
        kept = sae.encode(store.activations_of(tokens)[0])
    sae.train()
    code = torch.zeros(tokens.numel(), sae.dict_size)
    code[(tokens != 1).flatten()] = kept
    return tokens, code


def test_statistics_equal_a_brute_force_over_every_activation(matryoshka_run):
    cfg, store, sae, stats = matryoshka_run
    tokens, code = brute_force_code(sae, store)
    fired = code > 0
    n_tokens = int((tokens != 1).sum())
    assert stats.data["n_tokens"] == n_tokens
    checked_contexts = 0
    for i, latent in enumerate(stats.data["latents"]):
        column = code[:, i]
        assert latent["fire_count"] == int(fired[:, i].sum())
        assert latent["density"] == pytest.approx(int(fired[:, i].sum()) / n_tokens)
        if latent["fire_count"] == 0:
            assert latent["top_contexts"] == [] and latent["histogram"]["counts"] == []
            continue
        values = column[column > 0]
        assert latent["max_activation"] == pytest.approx(values.max().item(), rel=1e-6)
        assert latent["mean_activation"] == pytest.approx(values.mean().item(), rel=1e-5)
        bins = (
            ((values.log10() - HISTOGRAM_LOW_DECADE) * HISTOGRAM_BINS_PER_DECADE)
            .floor()
            .clamp(0, N_HISTOGRAM_BINS - 1)
        )
        expected = torch.bincount(bins.long(), minlength=N_HISTOGRAM_BINS).tolist()
        first = latent["histogram"]["first_bin"]
        got = [0] * first + latent["histogram"]["counts"]
        assert got + [0] * (N_HISTOGRAM_BINS - len(got)) == expected

        top = column.topk(min(TOP_N, len(values)))
        chosen = torch.tensor([c["token_index"] for c in latent["top_contexts"]])
        assert len(set(chosen.tolist())) == len(chosen)
        assert (
            column[chosen].tolist() == top.values.tolist()
        )  # the top values (ties: any of the tokens)
        for context in latent["top_contexts"]:
            row, col = divmod(context["token_index"], SEQ_LEN)
            first_col = max(col - CONTEXT, 0)
            window = slice(
                row * SEQ_LEN + first_col, row * SEQ_LEN + min(col + CONTEXT, SEQ_LEN - 1) + 1
            )
            assert context["tokens"] == tokens.flatten()[window].tolist()
            assert context["center"] == col - first_col
            torch.testing.assert_close(
                torch.tensor(context["activations"]), column[window], atol=0, rtol=1e-3
            )
            checked_contexts += 1
        for context in latent["random_contexts"]:  # real firings, none of them a top context
            assert column[context["token_index"]] > 0
            assert context["activation"] == pytest.approx(
                column[context["token_index"]].item(), rel=1e-3
            )
            assert context["token_index"] not in chosen.tolist()
            assert 0 <= context["quantile"] <= 1
    assert checked_contexts > 100


def test_co_firing_counts_and_hierarchy_equal_a_dense_product(matryoshka_run):
    cfg, store, sae, stats = matryoshka_run
    tokens, code = brute_force_code(sae, store)
    fired = (code > 0).float()
    co_fires = (fired.t() @ fired).long()  # [S, S], every pair of every token
    group = latent_groups(sae)
    n_parents = int((group < group.max()).sum())
    keep = tokens != 1
    code_rows = code.view(*tokens.shape, -1)
    collectors = [
        FeatureStatisticsCollector(sae.dict_size, groups, "cpu", top_n=2, n_random=1, context=1)
        for groups in (group, torch.zeros_like(group))
    ]  # with and without Matryoshka groups
    for rows, kept, acts in zip(
        tokens.split(7), keep.split(7), code_rows.split(7)
    ):  # not the store's chunks
        for collector in collectors:
            collector.add(rows, kept, acts[kept])
    later_group = group[:n_parents, None] < group  # the pairs a Matryoshka collector counts
    torch.testing.assert_close(collectors[0].co_fires.long(), co_fires[:n_parents] * later_group)
    torch.testing.assert_close(
        collectors[1].co_fires.long(), co_fires.triu(diagonal=1)
    )  # each pair once
    expected = hierarchy_links(co_fires[:n_parents], fired.sum(0).long(), group, int(keep.sum()))
    found = [
        (p, c)
        for p, latent in enumerate(stats.data["latents"])
        for c in [link["latent"] for link in latent["children"]]
    ]
    assert sorted(found) == sorted((p, c) for p, c, _ in expected)


def planted_code(n_tokens=6000, n_latents=32, planted=True, seed=0):
    """Synthetic codes: latents 0..7 fire independently (10%); with `planted`, latents 8+2p and
    9+2p (p < 4) fire only with latent p (half of its tokens each); the rest fire independently."""
    g = torch.Generator().manual_seed(seed)
    fires = torch.rand(n_tokens, n_latents, generator=g) < 0.05
    fires[:, :8] = torch.rand(n_tokens, 8, generator=g) < 0.10
    if planted:
        for p in range(4):
            for child in (8 + 2 * p, 9 + 2 * p):
                fires[:, child] = fires[:, p] & (torch.rand(n_tokens, generator=g) < 0.5)
    return fires * (0.5 + 2 * torch.rand(n_tokens, n_latents, generator=g))


def collect_toy(code, group):
    collector = FeatureStatisticsCollector(
        code.shape[1], group, "cpu", top_n=3, n_random=2, context=2
    )
    tokens = torch.randint(0, 50, (len(code) // 20, 20), generator=torch.Generator().manual_seed(1))
    for rows, acts in zip(tokens.split(16), code.split(16 * 20)):
        collector.add(rows, torch.ones_like(rows, dtype=torch.bool), acts)
    return hierarchy_links(collector.co_fires, collector.fire_counts, group, collector.n_tokens)


@pytest.mark.parametrize("matryoshka", [True, False])
def test_hierarchy_finds_planted_children_and_nothing_between_independent_latents(matryoshka):
    group = (torch.arange(32) >= 8).long() if matryoshka else torch.zeros(32, dtype=torch.long)
    planted = {(p, child) for p in range(4) for child in (8 + 2 * p, 9 + 2 * p)}
    assert {(p, c) for p, c, _ in collect_toy(planted_code(), group)} == planted
    assert collect_toy(planted_code(planted=False), group) == []


# ---------------------------------------------------------------------------------------------
# Saved statistics
# ---------------------------------------------------------------------------------------------


def test_saved_statistics_load_without_the_model(matryoshka_run, tmp_path):
    stats = matryoshka_run[3]
    page = write_feature_browser(stats, tmp_path / "browser")
    loaded = FeatureStatistics.load(page.parent / "feature_statistics.json")
    latent = max(range(len(loaded.data["latents"])), key=lambda i: loaded.latent(i)["fire_count"])
    contexts = loaded.top_contexts(latent)
    assert len(contexts) == TOP_N
    assert contexts[0]["activation"] == pytest.approx(
        stats.latent(latent)["max_activation"], rel=1e-3
    )
    assert contexts[0]["tokens"][contexts[0]["center"]] in contexts[0]["text"]
    assert "[[" in contexts[0]["text"]
    assert len(loaded.table()) == 128
    with pytest.raises(ValueError, match="format"):
        (tmp_path / "other.json").write_text(json.dumps({"format": "x"}))
        FeatureStatistics.load(tmp_path / "other.json")


# ---------------------------------------------------------------------------------------------
# The page in headless Chromium
# ---------------------------------------------------------------------------------------------


def busiest(stats, condition=lambda latent: True) -> int:
    candidates = [latent for latent in stats.data["latents"] if condition(latent)]
    return max(candidates, key=lambda latent: latent["fire_count"])["index"]


@needs_chromium
def test_page_shows_index_panel_hierarchy_and_dataset_text_as_text(matryoshka_run, tmp_path):
    stats = FeatureStatistics(json.loads(json.dumps(matryoshka_run[3].data)))  # a copy to alter
    assert any(latent["children"] for latent in stats.data["latents"]), (
        "the fixture has no hierarchy"
    )
    shown = busiest(stats, lambda latent: latent["children"])
    first = stats.latent(shown)["top_contexts"][0]
    stats.data["vocabulary"][str(first["tokens"][first["center"]])] = (
        PAYLOAD  # dataset text with markup
    )
    dom = rendered_dom(
        write_feature_browser(stats, tmp_path / "browser"), f"latent-{shown}", tmp_path
    )

    assert_rendered_without_errors(dom)
    assert len(re.findall(r'<tr data-latent="\d+"', dom)) == 128  # the index lists every latent
    assert f'<h2 id="latent-title">Latent {shown} ' in dom
    top = dom[dom.index('id="top-contexts"') : dom.index('id="random-contexts"')]
    assert top.count('class="context"') == len(stats.latent(shown)["top_contexts"])
    assert top.count('class="tok center"') == len(stats.latent(shown)["top_contexts"])
    assert "background: rgba(240, 120, 0" in top  # tokens shaded by activation
    assert re.search(r'<details class="node" data-latent="\d+"', dom)  # the hierarchy tree
    assert (
        f'href="#latent-{stats.latent(shown)["children"][0]["latent"]}"' in dom
    )  # children as links
    assert "&lt;script&gt;document.body.setAttribute" in dom  # the markup is shown as text
    assert "<script>document.body" not in dom and "<img src" not in dom


@needs_chromium
@pytest.mark.parametrize("kind", ["transcoder", "batchtopk"])
def test_transcoder_and_plain_sae_pages_render(kind, tiny_gemma2, tmp_path):
    if kind == "transcoder":
        cfg = create_transcoder_config(tiny_cfg(layer=0), source_layer=0, target_layer=0)
        store = TranscoderActivationsStore(tiny_gemma2, cfg)
    else:
        cfg = tiny_cfg("batchtopk")
        store = ActivationsStore(tiny_gemma2, cfg)
    sae = trained_threshold_sae(cfg, store)
    stats = collect_feature_statistics(sae, store, top_n=4, context=2, n_rows=16)
    assert stats.data["hierarchy"] == ("matryoshka" if kind == "transcoder" else "whole dictionary")
    assert "logits_up" in stats.latent(0)  # mlp_out and resid_pre are residual-stream vectors
    shown = busiest(stats)
    dom = rendered_dom(write_feature_browser(stats, tmp_path / kind), f"latent-{shown}", tmp_path)
    assert_rendered_without_errors(dom)
    assert f'<h2 id="latent-title">Latent {shown}' in dom and 'class="tok center"' in dom
    assert 'id="hierarchy-tree"' in dom


def test_inspect_script_builds_the_page_from_a_checkpoint(tiny_gpt2, tmp_path, monkeypatch, capsys):
    from matryoshka_sae.cli import inspect_sae

    cfg = tiny_cfg(dict_size=64, group_sizes=None)
    store = ActivationsStore(tiny_gpt2, cfg)
    folder = save_checkpoint(tmp_path / "run", trained_threshold_sae(cfg, store), cfg)
    data = tmp_path / "held_out.jsonl"
    data.write_text(
        "".join(json.dumps({"tokens": row}) + "\n" for row in token_dataset(50, seed=5)["tokens"])
    )
    monkeypatch.setattr(
        "matryoshka_sae.model_loading.load_model", lambda *args, **kwargs: tiny_gpt2
    )
    monkeypatch.setattr(
        "matryoshka_sae.model_loading.check_model_available", lambda name: None
    )  # "synthetic" stands in
    page = inspect_sae.main(
        [str(folder), "--dataset", str(data), "--num-tokens", "320", "--top-n", "3"]
    )
    assert page == folder / "feature_browser" / "feature_browser.html" and page.exists()
    assert capsys.readouterr().out.strip().endswith(str(page))
    loaded = FeatureStatistics.load(page.parent / "feature_statistics.json")
    documents = [torch.tensor(row) for row in token_dataset(50, seed=5)["tokens"]]
    rows, _ = pack_documents(documents, SEQ_LEN, 1, None, torch.empty(0, dtype=torch.long))
    assert loaded.data["n_rows"] == 10 and loaded.data["n_tokens"] == int((rows[:10] != 1).sum())
    assert loaded.data["source"]["checkpoint"] == str(folder)


def test_inspect_reads_the_builtin_held_out_split_for_an_in_memory_training_set(monkeypatch):
    from matryoshka_sae.cli import inspect_sae

    monkeypatch.setattr(
        "matryoshka_sae.builtin_corpus.python_docs_dataset",
        lambda split="all", **kwargs: f"python-docs:{split}",
    )
    saved = {
        **tiny_cfg(),
        "dataset_path": "<Dataset>",
        "eval_dataset_path": "<Dataset>",
    }  # as cfg_to_json writes them
    for argv in ([], ["--dataset", "python-docs"]):
        cfg = inspect_sae.inspection_cfg(
            saved, inspect_sae.build_parser().parse_args(["run", *argv])
        )
        assert (cfg["dataset_path"], cfg["eval_dataset_path"]) == (
            "python-docs:train",
            "python-docs:test",
        )
    cfg = inspect_sae.inspection_cfg(
        {**saved, "dataset_path": "my/data"},
        inspect_sae.build_parser().parse_args(["run", "--num-tokens", "1000"]),
    )
    assert (cfg["dataset_path"], cfg["eval_dataset_path"], cfg["n_eval_rows"]) == (
        "my/data",
        None,
        32,
    )
