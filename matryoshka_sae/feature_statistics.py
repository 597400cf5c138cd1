"""What each latent of a trained dictionary responds to: one streaming pass over held-out text.

For every latent i, over the T held-out tokens t (BOS positions excluded, as in training), with
z_ti its activation (the dictionary in eval mode):

    fire count      n_i = #{t : z_ti > 0},  density n_i / T
    activation      mean over the tokens where it fires, and max
    histogram       counts of its non-zero activations in fixed log-spaced bins (`HISTOGRAM_EDGES`)
    top contexts    the top_n tokens with the largest z_ti, each with the +-context tokens around it
                    (within its row) and z_i on every token of that window
    random contexts a uniform sample of n_random of its firings (each firing gets a random priority,
                    the largest priorities are kept): the typical case, mostly from the lower
                    quantiles, which the top contexts never show; each labelled with its quantile
    logit effects   the tokens whose logits the decoder direction W_dec[i] raises and lowers most
                    through the unembedding (`logit_effects`; a transcoder's W_dec is the target's)
    hierarchy       co-firing counts C[p, c] = #{t : z_tp > 0 and z_tc > 0}; latent p is a parent of
                    c when c fires mostly with p (`hierarchy_links`). Matryoshka: parents from earlier
                    groups, children from later ones; other dictionaries: across the whole
                    dictionary, the parent being the more frequent latent.

Streaming: each chunk of rows goes through `ActivationsStore.activations_of` and `sae.encode`; only
the chunk's [tokens, S] code exists at a time. The accumulators are [S] counters, an [S, bins]
histogram, per-latent running top-N tables of [S, N] entries with their [S, N, window] activations
(`RunningTopN`), and the co-firing counts [P, S] (P = latents of the groups before the last one,
or S without groups: 2016 x 4608 int32 for the demo, 37 MB). Nothing grows with the number of
tokens except the token ids themselves, which are kept to show the contexts' text.

`collect_feature_statistics(sae, store)` runs the pass and returns a `FeatureStatistics`, which
`save`s itself as JSON; `FeatureStatistics.load(path)` reads it back in a notebook without the model
(`stats.top_contexts(17)`). `collect_several_feature_statistics(saes, store)` does the same for
several dictionaries (a transcoder set: one per layer) in one pass of the model, each chunk's
activations of every hook from one forward pass (`MultiHookActivationsStore`).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
from tqdm import tqdm

HISTOGRAM_LOW_DECADE, HISTOGRAM_HIGH_DECADE, HISTOGRAM_BINS_PER_DECADE = -4, 4, 10
HISTOGRAM_EDGES = [
    10 ** (HISTOGRAM_LOW_DECADE + i / HISTOGRAM_BINS_PER_DECADE)
    for i in range((HISTOGRAM_HIGH_DECADE - HISTOGRAM_LOW_DECADE) * HISTOGRAM_BINS_PER_DECADE + 1)
]
N_HISTOGRAM_BINS = len(HISTOGRAM_EDGES) - 1  # values outside [1e-4, 1e4) fall into the end bins

MIN_PARENT_PROBABILITY = 0.6  # P(parent fires | child fires) at least this ...
MIN_LIFT = 2.0  # ... and at least this many times the parent's own density
MIN_CHILD_FIRINGS = 5  # children that fired fewer times are not judged
MAX_LINKS_PER_LATENT = 50  # parents and children listed per latent (the strongest first)
N_LOGITS = 10  # tokens listed per direction of the logit effects
FORMAT = "feature-statistics/1"


# ---------------------------------------------------------------------------------------------
# Running per-latent top-N
# ---------------------------------------------------------------------------------------------


class RunningTopN:
    """For each of S latents, the n entries with the largest keys seen so far, with their payload.

    keys [S, n] (-inf where empty), values [S, n] (the activation), positions [S, n] (global token
    index, -1 where empty), windows [S, n, W] (the latent's activation on the entry's window).
    `update` merges a chunk's entries: each latent's n largest of the chunk, then of old + new.
    Memory is S x n x (W + 3) numbers, whatever the number of tokens.
    """

    def __init__(self, n_latents: int, n: int, window: int, device: torch.device):
        self.n = n
        self.keys = torch.full((n_latents, n), -math.inf, device=device)
        self.values = torch.zeros(n_latents, n, device=device)
        self.positions = torch.full((n_latents, n), -1, dtype=torch.long, device=device)
        self.windows = torch.zeros(n_latents, n, window, device=device)

    def update(
        self,
        latents: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        positions: torch.Tensor,
        window_of,
    ) -> None:
        """Merge entries (flat [E] tensors); `window_of(entry_indices)` gives their [E', W] windows,
        asked only for the entries that enter the merge.

        Only an entry whose key beats its latent's current n-th largest can enter, so once the
        tables fill, few do, and only the rows of their latents are merged.
        """
        n = self.n
        candidates = (keys > self.keys.min(dim=1).values[latents]).nonzero().squeeze(1)
        by_key = candidates[keys[candidates].argsort(descending=True)]
        order = by_key[latents[by_key].argsort(stable=True)]  # grouped by latent, keys descending
        touched, per_latent = latents[order].unique_consecutive(return_counts=True)
        row = torch.arange(len(touched), device=keys.device).repeat_interleave(per_latent)
        rank = (
            torch.arange(len(order), device=keys.device) - (per_latent.cumsum(0) - per_latent)[row]
        )
        kept = rank < n
        entries, row, slot = order[kept], row[kept], rank[kept]

        def merged(table: torch.Tensor, new_values: torch.Tensor, empty: float) -> torch.Tensor:
            """The touched rows of `table` followed by the chunk's entries: [touched, 2n, ...]."""
            chunk = torch.full(
                (len(touched), *table.shape[1:]), empty, dtype=table.dtype, device=table.device
            )
            return torch.cat([table[touched], chunk.index_put_((row, slot), new_values)], dim=1)

        def best_of(table: torch.Tensor, new_values: torch.Tensor, empty: float) -> torch.Tensor:
            both = merged(table, new_values, empty)
            return both.flatten(0, 1).index_select(0, best).view(len(touched), n, *table.shape[2:])

        all_keys = merged(self.keys, keys[entries], -math.inf)  # [touched, 2n]
        best = all_keys.topk(n, dim=1).indices
        best = (best + 2 * n * torch.arange(len(touched), device=keys.device)[:, None]).flatten()
        self.keys[touched] = all_keys.flatten().index_select(0, best).view(len(touched), n)
        self.values[touched] = best_of(self.values, values[entries], 0)
        self.positions[touched] = best_of(self.positions, positions[entries], -1)
        self.windows[touched] = best_of(self.windows, window_of(entries), 0)


# ---------------------------------------------------------------------------------------------
# The streaming collector
# ---------------------------------------------------------------------------------------------


def latent_groups(sae) -> torch.Tensor:
    """[S] long: the Matryoshka group of each latent (all 0 for a dictionary without groups)."""
    ends = getattr(sae, "group_ends", None)
    if ends is None:
        return torch.zeros(sae.dict_size, dtype=torch.long)
    return torch.bucketize(torch.arange(sae.dict_size), ends.cpu(), right=True)


class FeatureStatisticsCollector:
    """Accumulates the statistics of the module docstring, chunk by chunk (`add`), on the SAE's device.

    `group` [S] gives each latent's Matryoshka group; with more than one group the co-firing counts
    are kept for the parents of the earlier groups (rows [0, P), P the start of the last group),
    else for the whole dictionary (P = S); `hierarchy=False` keeps none.
    """

    def __init__(
        self,
        dict_size: int,
        group: torch.Tensor,
        device,
        top_n: int = 20,
        n_random: int = 5,
        context: int = 8,
        seed: int = 0,
        hierarchy: bool = True,
    ):
        self.dict_size, self.context, self.device = dict_size, context, torch.device(device)
        self.group = group.to(self.device)
        self.matryoshka = bool(self.group.max() > 0)
        self.n_parents = (
            int((self.group < self.group.max()).sum()) if self.matryoshka else dict_size
        )
        window = 2 * context + 1
        self.fire_counts = torch.zeros(dict_size, dtype=torch.long, device=self.device)
        self.activation_sums = torch.zeros(dict_size, dtype=torch.float64, device=self.device)
        self.max_activations = torch.zeros(dict_size, device=self.device)
        self.histogram = torch.zeros(
            dict_size, N_HISTOGRAM_BINS, dtype=torch.long, device=self.device
        )
        self.top = RunningTopN(dict_size, top_n, window, self.device)
        self.random = RunningTopN(dict_size, n_random, window, self.device)
        self.co_fires = (
            torch.zeros(self.n_parents, dict_size, dtype=torch.int32, device=self.device)
            if hierarchy
            else None
        )
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.rows: list[torch.Tensor] = []  # token ids of every row seen, on the CPU
        self.n_tokens = 0

    @property
    def n_rows(self) -> int:
        return sum(len(rows) for rows in self.rows)

    @torch.no_grad()
    def add(self, tokens: torch.Tensor, keep: torch.Tensor, feature_acts: torch.Tensor) -> None:
        """One chunk: token rows [r, L], keep [r, L] (the positions that have activations: not BOS)
        and the code feature_acts [K, S] of those K kept positions, in row-major order."""
        seq_len = tokens.shape[1]
        kept_positions = (
            keep.flatten().nonzero().squeeze(1).to(self.device)
        )  # [K] position in chunk
        kept_index_of = torch.full((keep.numel(),), -1, dtype=torch.long, device=self.device)
        kept_index_of[kept_positions] = torch.arange(len(kept_positions), device=self.device)
        global_offset = self.n_rows * seq_len

        token_index, latents = feature_acts.nonzero(as_tuple=True)  # firings, grouped by token
        values = feature_acts[token_index, latents]
        self._add_counts(latents, values)
        positions = kept_positions[token_index] + global_offset

        def window_of(entries: torch.Tensor) -> torch.Tensor:
            """z of each entry's latent on the entry's window [E', 2 context + 1]; 0 off the row or at BOS."""
            position = kept_positions[token_index[entries]]
            row, column = position // seq_len, position % seq_len
            columns = column[:, None] + torch.arange(
                -self.context, self.context + 1, device=self.device
            )
            inside = (columns >= 0) & (columns < seq_len)
            index = kept_index_of[row[:, None] * seq_len + columns.clamp(0, seq_len - 1)]
            acts = feature_acts[index.clamp(min=0), latents[entries][:, None]]
            return torch.where(inside & (index >= 0), acts, torch.zeros_like(acts))

        self.top.update(latents, values, values, positions, window_of)
        priorities = torch.rand(len(values), generator=self.generator, device=self.device)
        self.random.update(latents, priorities, values, positions, window_of)
        if self.co_fires is not None:
            self._add_co_firings(token_index, latents, len(feature_acts))
        self.rows.append(tokens.cpu())
        self.n_tokens += len(feature_acts)

    def _add_counts(self, latents: torch.Tensor, values: torch.Tensor) -> None:
        self.fire_counts += torch.bincount(latents, minlength=self.dict_size)
        self.activation_sums.index_add_(0, latents, values.double())
        self.max_activations.scatter_reduce_(0, latents, values, reduce="amax")
        bins = ((values.log10() - HISTOGRAM_LOW_DECADE) * HISTOGRAM_BINS_PER_DECADE).floor()
        bins = bins.clamp(0, N_HISTOGRAM_BINS - 1).long()
        self.histogram.view(-1).index_add_(
            0, latents * N_HISTOGRAM_BINS + bins, torch.ones_like(bins)
        )

    def _add_co_firings(
        self, token_index: torch.Tensor, latents: torch.Tensor, n_tokens: int
    ) -> None:
        """C[p, c] += 1 for every token where p (< n_parents) and a later latent c both fire.

        "Later": of a later group (Matryoshka), else of a higher index (each unordered pair once;
        `hierarchy_links` adds the transpose). Firings come grouped by token with latents ascending
        and groups are ranges of latents, so each parent firing's partners are a suffix of its
        token's firings: pairs are formed from those only (cost: the pairs counted), never
        through a dense [tokens, S] product.
        """
        per_token = torch.bincount(token_index, minlength=n_tokens)
        token_end = per_token.cumsum(0)
        parents = (latents < self.n_parents).nonzero().squeeze(1)
        token = token_index[parents]
        if self.matryoshka:  # partners start after the token's firings in groups <= the parent's
            n_groups = int(self.group.max()) + 1
            group = self.group[latents]
            per_group = torch.bincount(
                token_index * n_groups + group, minlength=n_tokens * n_groups
            )
            up_to_group = per_group.view(n_tokens, n_groups).cumsum(1)
            start = token_end[token] - per_token[token] + up_to_group[token, group[parents]]
        else:
            start = parents + 1
        repeats = token_end[token] - start
        first = parents.repeat_interleave(repeats)
        pair_start = (
            repeats.cumsum(0) - repeats
        )  # pairs of parent firing j: pair_start[j] + 0, 1, ...
        second = torch.arange(len(first), device=self.device) + (
            start - pair_start
        ).repeat_interleave(repeats)
        flat = latents[first] * self.dict_size + latents[second]
        self.co_fires.view(-1).index_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))


# ---------------------------------------------------------------------------------------------
# The hierarchy and the logit effects
# ---------------------------------------------------------------------------------------------


def hierarchy_links(
    co_fires: torch.Tensor,
    fire_counts: torch.Tensor,
    group: torch.Tensor,
    n_tokens: int,
    min_probability: float = MIN_PARENT_PROBABILITY,
    min_lift: float = MIN_LIFT,
    min_child_firings: int = MIN_CHILD_FIRINGS,
    rows_per_step: int = 1024,
) -> list[tuple]:
    """Parent/child pairs from the co-firing counts C [P, S] of `FeatureStatisticsCollector`
    (rows: the candidate parents 0..P-1; without groups, C [S, S] holds each pair once, above the
    diagonal, and C + C^T is used).

    p is a parent of c when
        P(p | c) = C[p, c] / n_c >= min_probability,   P(p | c) >= min_lift * n_p / T,
        n_c >= min_child_firings,   and p comes first: group(p) < group(c) when the dictionary has
        groups, else n_p > n_c (ties: the lower index).
    The lift condition keeps a latent that fires on most tokens from being everyone's parent.
    Returns (parent, child, co_fires) triples, sorted by parent then child.
    """
    counts = fire_counts.to(co_fires.device).double()
    group = group.to(co_fires.device)
    matryoshka = bool(group.max() > 0)
    links = []
    for start in range(0, co_fires.shape[0], rows_per_step):
        block = co_fires[start : start + rows_per_step].double()  # [rows, S]
        if not matryoshka:
            block += co_fires[:, start : start + rows_per_step].t()
        parent = torch.arange(start, start + len(block), device=co_fires.device)
        p_given_child = block / counts.clamp(min=1)
        parent_density = counts[parent][:, None] / max(n_tokens, 1)
        ok = (p_given_child >= min_probability) & (p_given_child >= min_lift * parent_density)
        ok &= counts >= min_child_firings
        if matryoshka:
            ok &= group[parent][:, None] < group
        else:
            more = counts[parent][:, None] > counts
            tie = (counts[parent][:, None] == counts) & (
                parent[:, None] < torch.arange(len(counts), device=counts.device)
            )
            ok &= more | tie
        rows, children = ok.nonzero(as_tuple=True)
        links += list(
            zip((rows + start).tolist(), children.tolist(), block[rows, children].long().tolist())
        )
    return links


def unembedding_directions(model, directions: torch.Tensor) -> torch.Tensor:
    """Residual-stream directions [n, d_model] as the unembedding sees them, before W_U.

    The final norm is folded in: norm(x) = (x - mean(x)) / scale(x) * w (+ b), the centring for
    LayerNorm only. Along a direction d, the logits change by (d_centred * w) @ W_U / scale(x):
    the per-token scale is positive and common to every logit, so it changes no ranking, while the
    gain w (and the centring) do. This is the direct path only; later blocks are not modelled.
    """
    norm = getattr(model, "ln_final", None)
    if norm is not None and type(norm).__name__.startswith("LayerNorm"):
        directions = directions - directions.mean(dim=-1, keepdim=True)
    if norm is not None and hasattr(norm, "w"):
        directions = directions * norm.w.float()
    return directions


@torch.no_grad()
def logit_effects(model, W_dec: torch.Tensor, k: int = N_LOGITS, chunk: int = 512):
    """The k tokens each decoder row raises and lowers most: (up_ids, up_values, down_ids, down_values),
    each [S, k], from unembedding_directions(W_dec) @ W_U; None when the rows are not
    residual-stream vectors (their width is not d_model) or the model has no W_U."""
    W_U = getattr(model, "W_U", None)
    if W_U is None or W_dec.shape[1] != W_U.shape[0]:
        return None
    W_U = W_U.float()
    parts = []
    for rows in W_dec.split(chunk):
        logits = unembedding_directions(model, rows.to(W_U.device).float()) @ W_U  # [chunk, vocab]
        up, down = logits.topk(k, dim=1), logits.topk(k, dim=1, largest=False)
        parts.append((up.indices, up.values, down.indices, down.values))
    return tuple(torch.cat(part).cpu() for part in zip(*parts))


# ---------------------------------------------------------------------------------------------
# Collection
# ---------------------------------------------------------------------------------------------


def token_strings(model, ids: list[int]) -> dict[str, str]:
    """{str(id): text} for display: each token decoded alone, or "[id]" for a model without a tokenizer."""
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        return {str(i): f"[{i}]" for i in ids}
    return {str(i): tokenizer.decode([i]) for i in ids}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def collect_feature_statistics(
    sae,
    store,
    n_rows: int | None = None,
    top_n: int = 20,
    n_random: int = 5,
    context: int = 8,
    hierarchy: bool = True,
    seed: int = 0,
    source: dict | None = None,
) -> "FeatureStatistics":
    """One pass over the store's held-out rows (the first `n_rows`, default all), `sae` in eval mode.

    The rows go through `store.activations_of` (the training data path) in chunks of
    cfg["model_batch_size"] rows. Returns the `FeatureStatistics`; its "timing" says how long the
    model's forward passes took and what the statistics cost on top (encode and accumulate, and the
    once-per-dictionary logit effects and finishing, apart).
    """
    return collect_several_feature_statistics(
        [sae],
        store,
        n_rows,
        top_n,
        n_random,
        context,
        hierarchy,
        seed,
        [source or describe_source(store.cfg)],
    )[0]


def source_hook_index(sae, store) -> int:
    """Where the activations `sae` encodes are in `store.activations_of`'s list: its hook (a
    transcoder's source hook) among `store.hook_names`."""
    from matryoshka_sae.activation_store import dictionary_hooks

    hook = dictionary_hooks(sae.cfg)[0]
    if hook not in store.hook_names:
        raise ValueError(
            f"The store reads {store.hook_names} but the dictionary encodes {hook}; build the "
            f"store from the dictionaries' cfgs (MultiHookActivationsStore(model, cfgs))."
        )
    return store.hook_names.index(hook)


@torch.no_grad()
def collect_several_feature_statistics(
    saes,
    store,
    n_rows: int | None = None,
    top_n: int = 20,
    n_random: int = 5,
    context: int = 8,
    hierarchy: bool = True,
    seed: int = 0,
    sources: list | None = None,
) -> list["FeatureStatistics"]:
    """`collect_feature_statistics` for several dictionaries in one pass of the model: each chunk of
    held-out rows runs the model once (`store.activations_of`, e.g. a `MultiHookActivationsStore`
    over the dictionaries' cfgs) and every dictionary encodes its own hook's activations
    (`source_hook_index`) into its own `FeatureStatisticsCollector`. Returns one
    `FeatureStatistics` per dictionary, in the order of `saes`; `sources[j]` describes dictionary j
    (default: `describe_source` of its cfg). Its timing's forward_seconds is the shared pass.
    """
    model, cfg = store.model, store.cfg
    inputs = [source_hook_index(sae, store) for sae in saes]
    collectors = [
        FeatureStatisticsCollector(
            sae.dict_size,
            latent_groups(sae),
            sae.W_dec.device,
            top_n,
            n_random,
            context,
            seed,
            hierarchy,
        )
        for sae in saes
    ]
    was_training = [sae.training for sae in saes]
    timings = [
        {"forward_seconds": 0.0, "statistics_seconds": 0.0, "dictionaries_in_pass": len(saes)}
        for _ in saes
    ]
    for sae in saes:
        sae.eval()
    try:
        chunks = store.get_eval_tokens(n_rows).split(cfg["model_batch_size"])
        for chunk in tqdm(
            chunks, desc="Feature statistics", unit="chunk", leave=False, disable=None
        ):
            started = time.perf_counter()
            acts = store.activations_of(chunk)
            _sync(store.device)
            forwarded = time.perf_counter()
            keep = (
                chunk != store.bos
                if store.exclude_bos
                else torch.ones_like(chunk, dtype=torch.bool)
            )
            for sae, index, collector, timing in zip(saes, inputs, collectors, timings):
                started_dictionary = time.perf_counter()
                collector.add(chunk, keep, sae.encode(acts[index]))
                _sync(collector.device)
                timing["forward_seconds"] += forwarded - started
                timing["statistics_seconds"] += time.perf_counter() - started_dictionary
        effects = []
        for sae, timing in zip(saes, timings):
            started = time.perf_counter()
            effects.append(logit_effects(model, sae.W_dec.detach()))
            timing["logit_effects_seconds"] = time.perf_counter() - started
    finally:
        for sae, mode in zip(saes, was_training):
            sae.train(mode)
    sources = sources or [describe_source(sae.cfg) for sae in saes]
    results = []
    for sae, collector, effect, source, timing in zip(saes, collectors, effects, sources, timings):
        started = time.perf_counter()
        stats = _finish(collector, sae, model, effect, source)
        timing["finishing_seconds"] = time.perf_counter() - started
        timing["statistics_overhead"] = timing["statistics_seconds"] / max(
            timing["forward_seconds"], 1e-9
        )
        stats.data["timing"] = timing
        results.append(stats)
    return results


def collect_set_statistics(
    set_folder, cfg_of=None, model=None, **options
) -> dict[int, "FeatureStatistics"]:
    """{layer: statistics} of every transcoder of a set (transcoder_set.py's folder), in one pass
    of the model: a `MultiHookActivationsStore` over the layers' cfgs feeds
    `collect_several_feature_statistics`. `cfg_of(cfg)` adjusts each layer's saved cfg (the data
    to read, the device: inspect_sae.py's `inspection_cfg`); the store reads the held-out rows of
    the first layer's cfg. `model` defaults to the cfg's model (`model_loading.load_model`);
    `options` go to `collect_several_feature_statistics`.
    """
    from matryoshka_sae.activation_store import MultiHookActivationsStore
    from matryoshka_sae.checkpoint import load_cfg, load_sae
    from matryoshka_sae.transcoder_set import layer_folders

    folders = layer_folders(set_folder)
    cfgs = [load_cfg(folder) for folder in folders.values()]
    cfgs = [cfg_of(cfg) if cfg_of is not None else cfg for cfg in cfgs]
    cfgs = [
        {**cfg, "num_batches_in_buffer": 1} for cfg in cfgs
    ]  # the training buffer is not read here
    saes = [load_sae(folder, device=cfg["device"]) for folder, cfg in zip(folders.values(), cfgs)]
    if model is None:
        from matryoshka_sae.model_loading import load_model

        model = load_model(cfgs[0]["model_name"], cfgs[0]["device"], cfgs[0]["model_dtype"])
    store = MultiHookActivationsStore(model, cfgs)
    sources = [
        {**describe_source(cfg), "checkpoint": str(folder), "layer": layer}
        for (layer, folder), cfg in zip(folders.items(), cfgs)
    ]
    stats = collect_several_feature_statistics(saes, store, sources=sources, **options)
    return dict(zip(folders, stats))


def describe_source(cfg: dict) -> dict:
    """What the page and the JSON say about the dictionary."""
    keys = [
        "model_name",
        "sae_type",
        "dict_size",
        "group_sizes",
        "top_k",
        "hook_point",
        "source_hook_point",
        "target_hook_point",
        "name",
    ]
    return {key: cfg.get(key) for key in keys if cfg.get(key) is not None}


def _finish(
    collector: FeatureStatisticsCollector, sae, model, effects, source: dict
) -> "FeatureStatistics":
    """Turn the accumulators into the JSON-ready statistics (see `FeatureStatistics`)."""
    c = collector
    rows = torch.cat(c.rows) if c.rows else torch.zeros(0, 1, dtype=torch.long)
    counts = c.fire_counts.cpu()
    group = c.group.cpu()
    links = hierarchy_links(c.co_fires, counts, group, c.n_tokens) if c.co_fires is not None else []
    decoder = torch.nn.functional.normalize(sae.W_dec.detach().float(), dim=1)
    cosines = (
        (decoder[[p for p, _, _ in links]] * decoder[[ch for _, ch, _ in links]]).sum(1).tolist()
        if links
        else []
    )

    n_fired, sums = counts.tolist(), c.activation_sums.cpu().tolist()
    maxima, histograms = c.max_activations.cpu().tolist(), c.histogram.cpu().tolist()
    latents = [
        {
            "index": i,
            "group": int(group[i]),
            "fire_count": n_fired[i],
            "density": n_fired[i] / max(c.n_tokens, 1),
            "mean_activation": sums[i] / max(n_fired[i], 1),
            "max_activation": maxima[i],
            "histogram": _trimmed(histograms[i]),
            "parents": [],
            "children": [],
        }
        for i in range(c.dict_size)
    ]
    top = _contexts(c.top, rows, c.context)
    random = _contexts(c.random, rows, c.context)
    for i, latent in enumerate(latents):
        latent["top_contexts"] = top[i]
        seen = {context["token_index"] for context in top[i]}
        latent["random_contexts"] = sorted(
            (
                _with_quantile(ctx, histograms[i])
                for ctx in random[i]
                if ctx["token_index"] not in seen
            ),
            key=lambda ctx: -ctx["activation"],
        )
    for (parent, child, co_fires), cosine in zip(links, cosines):
        link = {
            "co_fires": co_fires,
            "p_parent_given_child": co_fires / int(counts[child]),
            "p_child_given_parent": co_fires / int(counts[parent]),
            "co_firing_rate": co_fires / max(c.n_tokens, 1),
            "decoder_cosine": round(cosine, 4),
        }
        latents[parent]["children"].append({"latent": child, **link})
        latents[child]["parents"].append({"latent": parent, **link})
    for latent in latents:
        for key in ("parents", "children"):
            latent[key].sort(key=lambda link: -link["p_parent_given_child"])
            latent[key] = latent[key][:MAX_LINKS_PER_LATENT]

    token_ids = set(rows.unique().tolist())
    if effects is not None:
        up_ids, up_values, down_ids, down_values = effects
        for i, latent in enumerate(latents):
            latent["logits_up"] = [
                [int(t), round(float(v), 4)] for t, v in zip(up_ids[i], up_values[i])
            ]
            latent["logits_down"] = [
                [int(t), round(float(v), 4)] for t, v in zip(down_ids[i], down_values[i])
            ]
        token_ids |= set(up_ids.unique().tolist()) | set(down_ids.unique().tolist())

    group_ends = torch.bincount(group, minlength=int(group.max()) + 1).cumsum(0).tolist()
    data = {
        "format": FORMAT,
        "source": source,
        "n_tokens": c.n_tokens,
        "n_rows": len(rows),
        "group_ends": group_ends,
        "hierarchy": ("matryoshka" if c.matryoshka else "whole dictionary")
        if c.co_fires is not None
        else None,
        "settings": {
            "top_n": c.top.n,
            "n_random": c.random.n,
            "context": c.context,
            "min_parent_probability": MIN_PARENT_PROBABILITY,
            "min_lift": MIN_LIFT,
            "min_child_firings": MIN_CHILD_FIRINGS,
            "histogram_edges": HISTOGRAM_EDGES,
            "logit_effects": "W_dec[i] with the final norm's gain folded in, @ W_U (direct path)"
            if effects is not None
            else None,
        },
        "vocabulary": token_strings(model, sorted(token_ids)),
        "latents": latents,
    }
    return FeatureStatistics(data)


def _trimmed(counts: list[int]) -> dict:
    """A histogram without its empty ends: {"first_bin": b, "counts": [...]}."""
    nonzero = [b for b, n in enumerate(counts) if n]
    if not nonzero:
        return {"first_bin": 0, "counts": []}
    return {"first_bin": nonzero[0], "counts": counts[nonzero[0] : nonzero[-1] + 1]}


def _with_quantile(context: dict, histogram: list[int]) -> dict:
    """Add the fraction of the latent's firings below the context's activation (to half its
    histogram bin: the bins are all that is kept of the other firings)."""
    bin_ = min(
        max(
            math.floor(
                (math.log10(context["activation"]) - HISTOGRAM_LOW_DECADE)
                * HISTOGRAM_BINS_PER_DECADE
            ),
            0,
        ),
        N_HISTOGRAM_BINS - 1,
    )
    below = sum(histogram[:bin_]) + 0.5 * histogram[bin_]
    return {**context, "quantile": round(below / max(sum(histogram), 1), 3)}


def _significant(values: torch.Tensor, digits: int = 4) -> list:
    """values rounded to `digits` significant digits, as (nested) Python lists of short floats."""
    v = values.detach().cpu().double()
    exponent = digits - 1 - v.abs().clamp(min=1e-30).log10().floor()
    scale = torch.pow(
        10.0, exponent.abs()
    )  # exact powers of ten: n / 10^e prints as a short decimal
    return torch.where(
        exponent >= 0, (v * scale).round() / scale, (v / scale).round() * scale
    ).tolist()


def _contexts(table: RunningTopN, rows: torch.Tensor, context: int) -> list[list[dict]]:
    """Per latent, its table's entries (largest key first) as JSON-ready contexts.

    A context: activation (at its token), token_index (global position: row * seq_len + column),
    tokens (ids of the window, cut at the row's ends), activations (the latent's, per token) and
    center (the index of the token itself in the window).
    """
    seq_len = rows.shape[1]
    keys, values = table.keys.cpu(), _significant(table.values)
    positions, windows = table.positions.cpu().tolist(), _significant(table.windows)
    order = keys.argsort(dim=1, descending=True).tolist()
    filled = torch.isfinite(keys).tolist()
    out = []
    for i in range(len(keys)):
        contexts = []
        for slot in order[i]:
            if not filled[i][slot]:
                continue
            row, column = divmod(positions[i][slot], seq_len)
            first, last = max(column - context, 0), min(column + context, seq_len - 1)
            contexts.append(
                {
                    "activation": values[i][slot],
                    "token_index": positions[i][slot],
                    "tokens": rows[row, first : last + 1].tolist(),
                    "activations": [
                        a or 0
                        for a in windows[i][slot][
                            first - column + context : last - column + context + 1
                        ]
                    ],
                    "center": column - first,
                }
            )
        out.append(contexts)
    return out


# ---------------------------------------------------------------------------------------------
# Saved statistics, for notebooks
# ---------------------------------------------------------------------------------------------


class FeatureStatistics:
    """The collected statistics: a JSON-ready dict (`data`) with accessors.

    data = {format, source (the dictionary), n_tokens, n_rows, group_ends, hierarchy, settings,
            timing, vocabulary {str(token id): text}, latents: [one dict per latent]}
    A latent: index, group, fire_count, density, mean_activation (when firing), max_activation,
    histogram {first_bin, counts} over settings.histogram_edges, top_contexts and random_contexts
    (see `_contexts`; random ones add quantile), logits_up / logits_down ([token id, logit] pairs),
    parents / children ({latent, co_fires, p_parent_given_child, p_child_given_parent,
    co_firing_rate, decoder_cosine}).

        stats = FeatureStatistics.load("checkpoints/<run>/feature_browser/feature_statistics.json")
        stats.top_contexts(17)       # [{"activation", "text", "tokens", "activations", "center"}, ...]
        stats.children(3)            # latents that fire mostly when latent 3 fires
    """

    def __init__(self, data: dict):
        self.data = data

    # -- files --------------------------------------------------------------------------------

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.data, separators=(",", ":")))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "FeatureStatistics":
        data = json.loads(Path(path).read_text())
        if data.get("format") != FORMAT:
            raise ValueError(
                f"{path} is not a feature-statistics file of format {FORMAT!r} "
                f"(found {data.get('format')!r}); collect it again with inspect_sae.py."
            )
        return cls(data)

    # -- per latent -----------------------------------------------------------------------------

    def latent(self, i: int) -> dict:
        return self.data["latents"][i]

    def token_text(self, token_id: int) -> str:
        return self.data["vocabulary"][str(token_id)]

    def _readable(self, context: dict) -> dict:
        tokens = [self.token_text(t) for t in context["tokens"]]
        center = context["center"]
        text = (
            "".join(tokens[:center]) + "[[" + tokens[center] + "]]" + "".join(tokens[center + 1 :])
        )
        return {**context, "tokens": tokens, "text": text}

    def top_contexts(self, i: int) -> list[dict]:
        """Latent i's top contexts, tokens as text; "text" marks the token itself with [[ ]]."""
        return [self._readable(context) for context in self.latent(i)["top_contexts"]]

    def random_contexts(self, i: int) -> list[dict]:
        return [self._readable(context) for context in self.latent(i)["random_contexts"]]

    def logit_effects(self, i: int) -> dict[str, list[tuple[str, float]]]:
        latent = self.latent(i)
        return {
            direction: [(self.token_text(t), v) for t, v in latent.get(f"logits_{direction}", [])]
            for direction in ("up", "down")
        }

    def parents(self, i: int) -> list[dict]:
        return self.latent(i)["parents"]

    def children(self, i: int) -> list[dict]:
        return self.latent(i)["children"]

    def describe_timing(self) -> str:
        """One line: tokens read, the model's forward time and what the statistics cost on top of it."""
        t = self.data["timing"]
        return (
            f"Feature statistics over {self.data['n_tokens']:,} tokens: model forward "
            f"{t['forward_seconds']:.1f} s, statistics {t['statistics_seconds']:.1f} s "
            f"(+{100 * t['statistics_overhead']:.0f}% of the forward), logit effects "
            f"{t['logit_effects_seconds']:.1f} s, finishing {t['finishing_seconds']:.1f} s."
        )

    def table(self):
        """One row per latent (index, group, fire_count, density, mean/max activation) as a pandas DataFrame."""
        import pandas as pd

        keys = ["index", "group", "fire_count", "density", "mean_activation", "max_activation"]
        return pd.DataFrame([{key: latent[key] for key in keys} for latent in self.data["latents"]])
