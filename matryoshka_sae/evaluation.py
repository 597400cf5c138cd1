"""Everything that measures a trained dictionary: the CE-loss splice, the report of a run, plots.

`evaluate_ce_loss` splices the dictionary into the model and measures next-token loss.

`reconstruction_report` measures what a researcher looks at first: the FVU of the full
reconstruction and of every Matryoshka prefix, L0, and how often each latent fires (dead latents
never fire on the held-out tokens; dense ones fire on more than `DENSE_FRACTION` of them).
`format_report` prints it with the CE losses of `evaluate_ce_loss`; the plot functions
draw a run's training history and the latents' firing densities. What each latent responds to
(contexts, histograms, logit effects, the Matryoshka hierarchy) is collected by
feature_statistics.py and shown by feature_browser.py.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from matryoshka_sae.activation_store import excluded_bos_token
from matryoshka_sae.config import clt_hooks, compute_fvu
from matryoshka_sae.preemption import stop_requested

DENSE_FRACTION = 0.1


# ---------------------------------------------------------------------------------------------
# CE-loss evaluation
# ---------------------------------------------------------------------------------------------


def is_transcoder(cfg: dict) -> bool:
    return cfg["sae_type"] == "matryoshka_transcoder"


def bos_mask(tokens: torch.Tensor, model, cfg: dict) -> torch.Tensor:
    """[rows, seq] bool: the BOS positions, with the activation store's notion of BOS."""
    return tokens == excluded_bos_token(model, {**cfg, "exclude_bos": True})


def _patch_hooks(
    cfg: dict, replace: Callable, keep: torch.Tensor | None
) -> list[tuple[str, Callable]]:
    """Forward hooks that overwrite the (target) activation with ``replace(source_act, target_act)``.

    For an SAE source and target are the same hook. Positions where `keep` ([rows, seq]) is True
    keep their original activation.
    """
    source_hook, target_hook = _source_and_target(cfg)
    captured: dict[str, torch.Tensor] = {}

    def capture(act, hook):
        captured["source"] = act

    def patch(act, hook):
        source = act if source_hook == target_hook else captured.pop("source", None)
        if source is None:
            raise ValueError(
                f"{source_hook} did not run before {target_hook}; a transcoder's source "
                f"hook must precede its target hook."
            )
        new = replace(source, act).reshape(act.shape).to(act.dtype)
        if keep is not None:
            new = torch.where(keep[..., None], act, new)
        return new

    hooks = [(target_hook, patch)]
    if source_hook != target_hook:
        hooks.insert(0, (source_hook, capture))
    return hooks


def is_cross_layer(cfg: dict) -> bool:
    return cfg["sae_type"] == "matryoshka_clt"


def _splice_hooks(
    sae, cfg: dict, keep: torch.Tensor | None, zero: bool = False
) -> list[tuple[str, Callable]]:
    """The forward hooks that replace what `sae` replaces (its target, or every target of a
    cross-layer transcoder) by its prediction, or by zeros if `zero`; `keep` as `_patch_hooks`."""
    if is_cross_layer(cfg):
        return _cross_layer_hooks(sae, cfg, keep, zero)
    replace = (lambda source, target: torch.zeros_like(target)) if zero else _reconstruction_of(sae)
    return _patch_hooks(cfg, replace, keep)


def _cross_layer_hooks(
    clt, cfg: dict, keep: torch.Tensor | None, zero: bool
) -> list[tuple[str, Callable]]:
    """A cross-layer transcoder spliced into a forward pass: at each source hook j its latents read
    the (already replaced) activation and write their contributions to the targets j..L-1
    (`layer_contributions`); at target hook m the sum over j <= m plus b_dec_m replaces the output."""
    sources, targets = clt_hooks(cfg)
    written: dict[int, torch.Tensor] = {}

    def read(act, hook, j):
        written[j] = clt.layer_contributions(j, act).view(
            *act.shape[:-1], clt.n_layers - j, clt.d_out
        )

    def write(act, hook, m):
        if zero:
            new = torch.zeros_like(act)
        else:
            new = (
                sum(written[j][..., m - j, :] for j in range(m + 1))
                + clt.b_dec[m] * clt.target_scale[m]
            )
            if m == clt.n_layers - 1:
                written.clear()
        new = new.to(act.dtype)
        return new if keep is None else torch.where(keep[..., None], act, new)

    hooks = [] if zero else [(name, functools.partial(read, j=j)) for j, name in enumerate(sources)]
    return hooks + [(name, functools.partial(write, m=m)) for m, name in enumerate(targets)]


@torch.no_grad()
def evaluate_ce_loss(
    sae, model, tokens: torch.Tensor, cfg: dict, kl: bool = False
) -> dict[str, float]:
    """Next-token CE loss of `model` on `tokens` ([rows, seq]) with the dictionary spliced in.

    Four runs of the model, each the mean loss per token:
        clean           unchanged model
        spliced         activation at cfg["hook_point"] replaced by sae.reconstruct(activation)
                        (transcoder: target activation replaced by its prediction from the source)
        zero_ablation   activation replaced by 0
        mean_ablation   activation replaced by its mean over the chunk's (non-BOS) positions
    and the summaries
        ce_degradation = spliced - clean
        loss_recovered = (zero_ablation - spliced) / (zero_ablation - clean)
    With `kl`, also the mean over predicted positions of KL(p_clean || p_spliced) and
    KL(p_clean || p_zero_ablation) as kl_div_spliced / kl_div_zero_ablation, and
        kl_div_score = (kl_div_zero_ablation - kl_div_spliced) / kl_div_zero_ablation
    With cfg["exclude_bos"], BOS positions keep their original activation in every intervention.
    The SAE runs in eval mode (no training state is touched); its mode is restored afterwards.
    Rows are processed in chunks of cfg["model_batch_size"], with a progress bar. Inside training,
    a stop signal (SIGTERM, Ctrl-C; see preemption.stop_requested) ends it early: it returns {}.
    """
    was_training = sae.training
    sae.eval()
    chunks = tokens.split(cfg["model_batch_size"])
    bar = tqdm(chunks, desc="CE evaluation", unit="batch", leave=False, disable=len(chunks) < 2)
    try:
        totals = {"clean": 0.0, "spliced": 0.0, "zero_ablation": 0.0, "mean_ablation": 0.0}
        for i, chunk in enumerate(bar):
            chunk = chunk.to(model.cfg.device)
            keep = bos_mask(chunk, model, cfg) if cfg["exclude_bos"] else None
            try:
                losses = _chunk_losses(sae, model, chunk, cfg, keep, kl)
            except _Stopped as stop:  # inside training, told to stop: the figures would be partial
                print(
                    f"CE evaluation stopped by {stop} after {i} of {len(chunks)} batches; its figures are left "
                    f"out.",
                    file=sys.stderr,
                )
                return {}
            for name, loss in losses.items():
                totals[name] = totals.get(name, 0.0) + loss * len(chunk) / len(tokens)
    finally:
        bar.close()
        sae.train(was_training)
    result = {
        name if name.startswith("kl_div") else f"ce_loss_{name}": value
        for name, value in totals.items()
    }
    result["ce_degradation"] = totals["spliced"] - totals["clean"]
    ablation_gap = totals["zero_ablation"] - totals["clean"]
    result["loss_recovered"] = (totals["zero_ablation"] - totals["spliced"]) / ablation_gap
    if kl:
        result["kl_div_score"] = (
            totals["kl_div_zero_ablation"] - totals["kl_div_spliced"]
        ) / totals["kl_div_zero_ablation"]
    return result


class _Stopped(Exception):
    """A stop signal arrived during the CE evaluation (its name is the message)."""


def _chunk_losses(sae, model, tokens, cfg, keep, kl=False) -> dict[str, float]:
    def mean_ablated(source, target):
        positions = target if keep is None else target[~keep]
        return positions.reshape(-1, target.shape[-1]).mean(0).expand_as(target)

    replacements = {
        "spliced": _reconstruction_of(sae),
        "zero_ablation": lambda s, t: torch.zeros_like(t),
        "mean_ablation": mean_ablated,
    }
    if kl:  # the logits themselves, for the KL divergences; the losses from the same logits
        clean_logits = model(tokens)
        losses = {"clean": _next_token_loss(clean_logits, tokens)}
    else:
        losses = {"clean": model(tokens, return_type="loss")}
    for name, replace in replacements.items():
        if stop_requested() is not None:  # between the model runs: a stop waits for one run at most
            raise _Stopped(stop_requested())
        hooks = _patch_hooks(cfg, replace, keep)
        if kl and name != "mean_ablation":
            logits = model.run_with_hooks(tokens, fwd_hooks=hooks)
            losses[name] = _next_token_loss(logits, tokens)
            losses[f"kl_div_{name}"] = _mean_kl(clean_logits[:, :-1], logits[:, :-1])
        else:
            losses[name] = model.run_with_hooks(tokens, return_type="loss", fwd_hooks=hooks)
    values = torch.stack([loss.float() for loss in losses.values()]).tolist()
    return dict(zip(losses, values))


# ---------------------------------------------------------------------------------------------
# Several dictionaries spliced in at once (a transcoder set: every MLP replaced)
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate_replacement(saes, cfgs, model, tokens: torch.Tensor) -> dict[str, float]:
    """Next-token CE loss of `model` on `tokens` ([rows, seq]) with every dictionary of `saes`
    spliced in at once (each at its cfg's target hook, reading its source hook in the same,
    already replaced, forward pass; a cross-layer transcoder at every target of its layers), and
    how far its predictions move from the model's:

        ce_loss_clean, ce_loss_spliced, ce_loss_zero_ablation (every target set to 0)
        loss_recovered = (zero_ablation - spliced) / (zero_ablation - clean)
        kl_divergence  = mean over predicted tokens of KL(p_clean || p_spliced)

    BOS positions keep their activations (cfg["exclude_bos"] of cfgs[0]); chunks of
    cfgs[0]["model_batch_size"] rows; the dictionaries run in eval mode, their modes restored.
    """
    cfg = cfgs[0]
    totals = {"clean": 0.0, "spliced": 0.0, "zero_ablation": 0.0, "kl_divergence": 0.0}
    chunks = tokens.split(cfg["model_batch_size"])
    with in_eval_mode(saes):
        for chunk in tqdm(
            chunks,
            desc="Replacement evaluation",
            unit="batch",
            leave=False,
            disable=len(chunks) < 2,
        ):
            chunk = chunk.to(model.cfg.device)
            keep = bos_mask(chunk, model, cfg) if cfg["exclude_bos"] else None
            spliced = [
                hook
                for sae, sae_cfg in zip(saes, cfgs)
                for hook in _splice_hooks(sae, sae_cfg, keep)
            ]
            zeroed = [
                hook
                for sae, sae_cfg in zip(saes, cfgs)
                for hook in _splice_hooks(sae, sae_cfg, keep, zero=True)
            ]
            clean_logits = model(chunk)
            spliced_logits = model.run_with_hooks(chunk, fwd_hooks=spliced)
            losses = {
                "clean": _next_token_loss(clean_logits, chunk),
                "spliced": _next_token_loss(spliced_logits, chunk),
                "zero_ablation": model.run_with_hooks(
                    chunk, return_type="loss", fwd_hooks=zeroed
                ).float(),
                "kl_divergence": _mean_kl(clean_logits[:, :-1], spliced_logits[:, :-1]),
            }
            for name, value in losses.items():
                totals[name] += value.item() * len(chunk) / len(tokens)
    result = {f"ce_loss_{name}": totals[name] for name in ("clean", "spliced", "zero_ablation")}
    result["ce_degradation"] = totals["spliced"] - totals["clean"]
    result["loss_recovered"] = (totals["zero_ablation"] - totals["spliced"]) / (
        totals["zero_ablation"] - totals["clean"]
    )
    result["kl_divergence"] = totals["kl_divergence"]
    return result


@contextlib.contextmanager
def in_eval_mode(saes):
    """Within it every dictionary of `saes` is in eval mode; their modes are restored after."""
    modes = [sae.training for sae in saes]
    for sae in saes:
        sae.eval()
    try:
        yield
    finally:
        for sae, mode in zip(saes, modes):
            sae.train(mode)


def _reconstruction_of(sae) -> Callable:
    return lambda source, target: sae.reconstruct(source.reshape(-1, source.shape[-1]))


def _next_token_loss(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Mean CE of predicting tokens[:, 1:] from logits[:, :-1] (what return_type="loss" gives)."""
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten()
    )


def _mean_kl(clean_logits: torch.Tensor, other_logits: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(softmax(clean) || softmax(other)), logits [..., vocab]."""
    clean = clean_logits.float().log_softmax(-1)
    other = other_logits.float().log_softmax(-1)
    return (clean.exp() * (clean - other)).sum(-1).mean()


@torch.no_grad()
def layer_statistics(saes, cfgs, model, tokens: torch.Tensor) -> list[dict[str, float]]:
    """Each dictionary's {"fvu", "l0"} on the clean model's activations of `tokens` (BOS positions
    left out when cfgs[0]["exclude_bos"]), at inference, in chunks of model_batch_size rows: one
    model pass per chunk. l0 is the mean number of active latents a token."""
    names = sorted({name for c in cfgs for name in _source_and_target(c)})
    pairs: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in saes]
    active = torch.zeros(len(saes))
    chunks = tokens.split(cfgs[0]["model_batch_size"])
    with in_eval_mode(saes):
        for chunk in tqdm(
            chunks, desc="Per-layer FVU", unit="batch", leave=False, disable=len(chunks) < 2
        ):
            chunk = chunk.to(model.cfg.device)
            _, cache = model.run_with_cache(chunk, names_filter=names)
            keep = _kept_positions(chunk, model, cfgs[0])
            for i, (sae, c) in enumerate(zip(saes, cfgs)):
                source_hook, target_hook = _source_and_target(c)
                source, target = cache[source_hook][keep], cache[target_hook][keep]
                pairs[i].append((target.float(), sae.reconstruct(source)))
                active[i] += (sae.encode(source) > 0).sum().cpu()
    return [
        {
            "fvu": compute_fvu(torch.cat([t for t, _ in p]), torch.cat([r for _, r in p])).item(),
            "l0": n.item() / sum(len(t) for t, _ in p),
        }
        for p, n in zip(pairs, active)
    ]


@torch.no_grad()
def evaluate_clt(clt, model, tokens: torch.Tensor) -> dict:
    """A cross-layer transcoder on `tokens` [rows, seq]: `evaluate_replacement` (every target of its
    layers replaced at once, each layer's latents reading the source of the replaced forward pass)
    and, on the clean model's activations (BOS left out when cfg["exclude_bos"]):

        fvu_per_layer {layer: FVU of its target}, fvu_mean, fvu_max (compute_fvu per layer)
        l0_per_layer {layer: active latents a token at that source layer}, l0_total (their sum)

    at inference (thresholds), in chunks of model_batch_size rows."""
    cfg = clt.cfg
    result = evaluate_replacement([clt], [cfg], model, tokens)
    sources, targets = clt_hooks(cfg)
    predictions, actual, active = [], [], torch.zeros(clt.n_layers)
    with in_eval_mode([clt]):
        for chunk in tokens.split(cfg["model_batch_size"]):
            chunk = chunk.to(model.cfg.device)
            _, cache = model.run_with_cache(chunk, names_filter=sources + targets)
            keep = _kept_positions(chunk, model, cfg)
            x = torch.stack([cache[name][keep] for name in sources], dim=1)  # [N, L, d_in]
            actual.append(torch.stack([cache[name][keep] for name in targets], dim=1).float())
            predictions.append(clt.reconstruct(x))
            latents = clt.encode(x).view(-1, clt.n_layers, clt.latents_per_layer)
            active += (latents > 0).sum(dim=(0, 2)).float().cpu()
    y, y_hat = torch.cat(actual), torch.cat(predictions)
    fvus = [compute_fvu(y[:, j], y_hat[:, j]).item() for j in range(clt.n_layers)]
    layers = [str(layer) for layer in cfg["clt_layers"]]
    result["fvu_per_layer"] = dict(zip(layers, fvus))
    result["fvu_mean"], result["fvu_max"] = sum(fvus) / len(fvus), max(fvus)
    result["l0_per_layer"] = dict(zip(layers, (active / len(y)).tolist()))
    result["l0_total"] = (active.sum() / len(y)).item()
    return result


def _kept_positions(chunk: torch.Tensor, model, cfg: dict) -> torch.Tensor:
    """[rows, seq] bool: the positions a dictionary is measured on (all but BOS when cfg["exclude_bos"])."""
    return (
        ~bos_mask(chunk, model, cfg)
        if cfg["exclude_bos"]
        else torch.ones_like(chunk, dtype=torch.bool)
    )


def _source_and_target(cfg: dict) -> tuple[str, str]:
    """The hooks a dictionary reads and replaces: a transcoder's source and target, else hook_point twice."""
    if is_transcoder(cfg):
        return cfg["source_hook_point"], cfg["target_hook_point"]
    return cfg["hook_point"], cfg["hook_point"]


# ---------------------------------------------------------------------------------------------
# Held-out report and plots
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def reconstruction_report(
    sae, x: torch.Tensor, target: torch.Tensor | None = None, chunk_size: int = 4096
) -> dict:
    """Metrics of `sae` (in eval mode) on held-out inputs x [N, d_in] (transcoder: and targets).

    Returns fvu, fvu_per_prefix (a list; one entry for non-Matryoshka SAEs), l0_norm,
    firing_density [S] (fraction of tokens on which each latent fires), dead_fraction and
    dense_fraction. Run in chunks; FVU is computed over all N tokens at once.
    """
    was_training = sae.training
    sae.eval()
    try:
        prefixes, fired_counts, l0_total = [], torch.zeros(sae.dict_size, device=x.device), 0.0
        for chunk in x.split(chunk_size):
            active = sae.encode(chunk) > 0
            fired_counts += active.sum(dim=0)
            l0_total += active.sum().item()
            prefixes.append(sae.reconstruct_prefixes(chunk))
    finally:
        sae.train(was_training)
    y = (x if target is None else target).float()
    reconstructions = torch.cat(prefixes)
    fvus = [compute_fvu(y, reconstructions[:, g]).item() for g in range(reconstructions.shape[1])]
    density = fired_counts / len(x)
    return {
        "fvu": fvus[-1],
        "fvu_per_prefix": fvus,
        "l0_norm": l0_total / len(x),
        "firing_density": density.cpu(),
        "dead_fraction": (density == 0).float().mean().item(),
        "dense_fraction": (density > DENSE_FRACTION).float().mean().item(),
    }


def format_report(
    report: dict, ce: dict | None = None, group_sizes: list[int] | None = None
) -> str:
    """A plain-text table of `reconstruction_report` (and `evaluate_ce_loss`) results."""
    lines = ["Held-out evaluation", "-------------------"]
    fvus = report["fvu_per_prefix"]
    ends = torch.tensor(group_sizes).cumsum(0).tolist() if group_sizes else [None] * len(fvus)
    if len(fvus) > 1:
        lines.append(f"{'prefix':<8}{'latents':>10}{'FVU':>10}")
        for g, (end, fvu) in enumerate(zip(ends, fvus)):
            lines.append(f"{g:<8}{'0..' + str(end) if end else '':>10}{fvu:>10.4f}")
    lines += [
        f"{'FVU (full dictionary)':<28}{report['fvu']:.4f}",
        f"{'L0 (active latents/token)':<28}{report['l0_norm']:.1f}",
        f"{'dead latents':<28}{100 * report['dead_fraction']:.1f}%  (never fired on held-out tokens)",
        f"{'dense latents':<28}{100 * report['dense_fraction']:.1f}%  (fire on >{DENSE_FRACTION:.0%} of tokens)",
    ]
    if ce is not None:
        lines += [
            f"{'CE loss clean':<28}{ce['ce_loss_clean']:.4f}",
            f"{'CE loss with SAE spliced':<28}{ce['ce_loss_spliced']:.4f}",
            f"{'CE loss zero-ablated':<28}{ce['ce_loss_zero_ablation']:.4f}",
            f"{'CE loss mean-ablated':<28}{ce['ce_loss_mean_ablation']:.4f}",
            f"{'CE loss recovered':<28}{100 * ce['loss_recovered']:.1f}%",
        ]
    return "\n".join(lines)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    return plt


def plot_prefix_fvu(history: list[dict], path: str | Path) -> Path:
    """FVU of each Matryoshka prefix (or of the SAE) over training steps, as a PNG."""
    plt = _pyplot()
    steps = [row["step"] for row in history]
    keys = sorted(
        (k for k in history[0] if k.startswith("fvu_prefix_")),
        key=lambda k: int(k.rsplit("_", 1)[1]),
    )
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key in keys or ["fvu"]:
        label = f"prefix {key.rsplit('_', 1)[1]}" if keys else "FVU"
        ax.plot(steps, [row[key] for row in history], label=label)
    ax.set(
        xlabel="training step",
        ylabel="FVU (training batch)",
        yscale="log",
        title="Reconstruction of each nested prefix",
    )
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_firing_density(density: torch.Tensor, path: str | Path) -> Path:
    """Histogram of log10(firing density) over latents, dead latents counted apart, as a PNG."""
    plt = _pyplot()
    alive = density[density > 0]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.hist(alive.log10().numpy(), bins=50)
    ax.axvline(torch.log10(torch.tensor(DENSE_FRACTION)).item(), color="gray", linestyle="--")
    dead = int((density == 0).sum())
    ax.set(
        xlabel="log10(fraction of held-out tokens on which the latent fires)",
        ylabel="latents",
        title=f"Latent firing density ({dead} of {len(density)} latents never fired)",
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
