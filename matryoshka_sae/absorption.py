"""First-letter feature absorption of a dictionary, by SAEBench's definition (Chanin et al.'s
absorption metric with Till's absorption fraction), implemented here from that definition.

Caveat (SAEBench's own): the metric is meaningful only for models that spell well (SAEBench does
not recommend it below 1B parameters) and dictionaries wide enough to absorb (not below 16k
latents). On SmolLM2-135M with a few thousand latents the figures compare dictionaries trained
alike; they are not comparable with SAEBench's published tables.

Data (one model pass, shared by every dictionary at the same hook): alphabetic single tokens of the
vocabulary ("cat", " Cat"; letters only, a leading space allowed), each in an in-context prompt

    <bos>{w1} has the first letter: W\\n ... {w10} has the first letter: W\\n{word} has the first letter:

built from token ids (ten random other words as examples), and the model's activation at the
dictionary's hook on the word's token. 80% of the words train, 20% test.

Per dictionary:
1. Ground-truth probe: a 26-way one-vs-rest logistic probe on the activations (BCE weighted by the
   class balance, Adam), F1 per letter on the test words (score > 0).
2. k-sparse probes on the latents: an L1-regularised 26-way probe (50 epochs in batches of
   min(4096, N/8), at least 64) picks, per letter, the k latents with the largest weights (k = 1..10); a logistic regression on those k latents gives F1_k.
   Feature splitting: starting at k = 1, k grows while F1_k > best F1 so far + 0.03; the letter's
   main latents are those of the last k reached.
3. For each test word of the letter that the probe detects (score > 0), with p̂ the unit probe
   direction, a = activation · p̂ and c_i = latent i's contribution to the reconstruction
   projected on p̂ (z_i · ||W_dec,i|| · cos(W_dec,i, p̂), in the model's units), m = sum of c_i
   over the main latents:
     absorption fraction: candidates are the other latents with cos(W_dec,i, p̂) >= 0.1 and c_i > 0;
       A = sum of the 3 largest candidate c_i. If m >= a or A < 0.4 a: 0; else if m <= 0: 1;
       else min(A, a - m) / (min(A, a - m) + m), clipped to [0, 1].
     full absorption: every main latent is inactive, a > 0, and the latent with the largest c_i
       has cos >= 0.025 and c_i >= 0.4 a.
   Per letter: sum of fractions / detected words, and full absorptions / detected words.
4. Scores: the means of those over the letters whose probe F1 > 0.6.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch

LETTERS = "abcdefghijklmnopqrstuvwxyz"
PROMPT_SUFFIX = " has the first letter:"
ICL_EXAMPLES = 10
TRAIN_FRACTION = 0.8
MAX_K = 10
F1_JUMP = 0.03
MIN_PROBE_F1 = 0.6
FRACTION_COS = 0.1
FULL_COS = 0.025
PROJECTION_SHARE = 0.4
MAX_ABSORBERS = 3
CAVEAT = (
    "SAEBench does not recommend this metric below 1B-parameter models or 16k latents; "
    "compare dictionaries trained alike, not with published tables."
)


@dataclass
class LetterData:
    """Words, their first letters (0..25), the model's activations on them [N, d] and the split."""

    hook_name: str
    words: list[str]
    labels: torch.Tensor
    acts: torch.Tensor
    train: torch.Tensor
    test: torch.Tensor


# ---------------------------------------------------------------------------------------------
# Data: one model pass
# ---------------------------------------------------------------------------------------------


def alphabetic_tokens(tokenizer) -> list[tuple[int, str]]:
    """(id, text) of the vocabulary's tokens made of ASCII letters only (one leading space allowed)."""
    tokens = []
    for token_id in range(len(tokenizer)):
        text = tokenizer.decode([token_id])
        word = text[1:] if text.startswith(" ") else text
        if word.isascii() and word.isalpha():
            tokens.append((token_id, text))
    return tokens


def letter_prompts(
    tokenizer, words: list[tuple[int, str]], examples: list[tuple[int, str]], seed: int = 0
) -> tuple[torch.Tensor, int]:
    """Token ids [N, L] of the prompts of `words` (see the module docstring) and the word's position."""
    rng = random.Random(seed)
    suffix = tokenizer.encode(PROMPT_SUFFIX, add_special_tokens=False)
    newline = tokenizer.encode("\n", add_special_tokens=False)
    answers = {
        letter: tokenizer.encode(" " + letter.upper(), add_special_tokens=False)
        for letter in LETTERS
    }
    start = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    rows = []
    for token_id, _text in words:
        shown = rng.sample([e for e in examples if e[0] != token_id], ICL_EXAMPLES)
        ids = list(start)
        for example_id, example in shown:
            ids += [example_id, *suffix, *answers[example.strip()[0].lower()], *newline]
        rows.append(ids + [token_id, *suffix])
    lengths = {len(row) for row in rows}
    if len(lengths) != 1:
        raise ValueError(
            "The letter prompts differ in length: a letter's answer is not one token for this tokenizer."
        )
    return torch.tensor(rows), -1 - len(suffix)


@torch.no_grad()
def collect_letter_data(
    model, hook_name: str, n_words: int = 1500, seed: int = 0, batch_size: int = 32
) -> LetterData:
    """The model's activations at `hook_name` on `n_words` random alphabetic tokens (one pass)."""
    vocabulary = alphabetic_tokens(model.tokenizer)
    rng = random.Random(seed)
    words = rng.sample(vocabulary, min(n_words, len(vocabulary)))
    prompts, position = letter_prompts(model.tokenizer, words, vocabulary, seed)
    acts = []
    for i, chunk in enumerate(prompts.split(batch_size)):
        _, cache = model.run_with_cache(
            chunk.to(model.cfg.device),
            names_filter=[hook_name],
            stop_at_layer=_stop_layer(hook_name),
        )
        acts.append(cache[hook_name][:, position].float().cpu())
        print(
            f"\rabsorption: model activations {min((i + 1) * batch_size, len(prompts))}/{len(prompts)} words",
            end="",
            flush=True,
        )
    print()
    labels = torch.tensor([LETTERS.index(text.strip()[0].lower()) for _, text in words])
    order = torch.randperm(len(words), generator=torch.Generator().manual_seed(seed))
    n_train = int(TRAIN_FRACTION * len(words))
    return LetterData(
        hook_name,
        [text for _, text in words],
        labels,
        torch.cat(acts),
        order[:n_train],
        order[n_train:],
    )


def _stop_layer(hook_name: str) -> int | None:
    from matryoshka_sae.activation_store import block_index

    block = block_index(hook_name)
    return None if block is None else block + 1


# ---------------------------------------------------------------------------------------------
# Probes
# ---------------------------------------------------------------------------------------------


def train_multi_probe(
    x: torch.Tensor,
    labels: torch.Tensor,
    n_classes: int = len(LETTERS),
    l1: float = 0.0,
    epochs: int = 50,
    batch_size: int = 64,
    lr: float = 1e-2,
    end_lr: float = 1e-5,
    weight_decay: float = 1e-6,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One-vs-rest logistic probes for `n_classes` classes on x [N, d]: (weights [C, d], biases [C]).

    Loss: BCE with each class's positives weighted by negatives / positives, plus
    l1 * mean_c sum_j |w_cj|; Adam with weight decay, the learning rate decaying exponentially from
    lr to end_lr over the run (SAEBench's probe training)."""
    generator = torch.Generator().manual_seed(seed)
    x = x.float()
    targets = torch.nn.functional.one_hot(labels, n_classes).float()
    positives = targets.sum(0)
    pos_weight = (len(x) - positives) / positives.clamp(min=1)
    probe = torch.nn.Linear(x.shape[1], n_classes)
    torch.nn.init.normal_(probe.weight, std=0.01, generator=generator)
    torch.nn.init.zeros_(probe.bias)
    optimizer = torch.optim.Adam(probe.parameters(), lr=lr, weight_decay=weight_decay)
    steps = epochs * -(-len(x) // batch_size)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(
        optimizer, gamma=(end_lr / lr) ** (1 / steps)
    )
    loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=pos_weight)
    with torch.enable_grad():
        for _ in range(epochs):
            for batch in torch.randperm(len(x), generator=generator).split(batch_size):
                loss = loss_fn(probe(x[batch]), targets[batch])
                if l1:
                    loss = loss + l1 * probe.weight.abs().sum(-1).mean()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                scheduler.step()
    return probe.weight.detach(), probe.bias.detach()


def f1_score(predicted: torch.Tensor, actual: torch.Tensor) -> float:
    """F1 of boolean predictions against boolean truth (0 when there is nothing to find or found)."""
    tp = (predicted & actual).sum().item()
    denominator = predicted.sum().item() + actual.sum().item()
    return 2 * tp / denominator if denominator else 0.0


def k_sparse_main_latents(
    codes_train: torch.Tensor,
    labels_train: torch.Tensor,
    codes_test: torch.Tensor,
    labels_test: torch.Tensor,
    n_classes: int = len(LETTERS),
    max_k: int = MAX_K,
    f1_jump: float = F1_JUMP,
    seed: int = 0,
) -> tuple[list[list[int]], list[list[float]]]:
    """Per class: its main latents (feature splitting rule, module docstring) and F1_k for k = 1..max_k."""
    from sklearn.linear_model import LogisticRegression

    # SAEBench's batch of 4096 over its whole vocabulary gives a few hundred steps in 50 epochs; a
    # smaller word sample gets as many through smaller batches.
    batch_size = min(4096, max(64, len(codes_train) // 8))
    weights, _ = train_multi_probe(
        codes_train, labels_train, n_classes, l1=0.01, batch_size=batch_size, seed=seed
    )
    main, f1s = [], []
    for c in range(n_classes):
        chosen = weights[c].topk(max_k).indices
        f1_by_k, feats_by_k = [], []
        for k in range(1, max_k + 1):
            feats = chosen[:k]
            truth = labels_train == c
            if truth.all() or not truth.any():
                f1_by_k.append(0.0)
            else:
                probe = LogisticRegression(max_iter=500, class_weight="balanced")
                probe.fit(codes_train[:, feats].numpy(), truth.numpy())
                scores = torch.from_numpy(probe.decision_function(codes_test[:, feats].numpy()))
                f1_by_k.append(f1_score(scores > 0, labels_test == c))
            feats_by_k.append(feats.tolist())
        main.append(split_latents(f1_by_k, feats_by_k, f1_jump))
        f1s.append(f1_by_k)
    return main, f1s


def split_latents(
    f1_by_k: list[float], feats_by_k: list[list[int]], f1_jump: float = F1_JUMP
) -> list[int]:
    """The latents of the last k reached while F1_k exceeds the best F1 so far by more than f1_jump."""
    best, chosen = -float("inf"), []
    for f1, feats in zip(f1_by_k, feats_by_k):
        if f1 <= best + f1_jump:
            break
        best, chosen = f1, feats
    return chosen


# ---------------------------------------------------------------------------------------------
# Absorption
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def latent_projections(
    sae, acts: torch.Tensor, direction: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(c [N, S], cos [S]): each latent's contribution to the reconstruction of acts [N, d] projected
    on the unit vector of `direction`, in the model's units, and cos(W_dec,i, direction)."""
    unit = direction.float() / direction.float().norm()
    codes = sae.encode(acts)
    _, stats = sae.normalize_source(acts.reshape(-1, acts.shape[-1]))
    scale = 1.0 if stats is None else stats[2]  # back from normalised units, [N, 1]
    decoder = sae.W_dec.float()
    return codes * (decoder @ unit) * scale, torch.nn.functional.cosine_similarity(
        decoder, unit[None], dim=-1
    )


def absorption_scores(
    codes: torch.Tensor,
    contributions: torch.Tensor,
    cos: torch.Tensor,
    projection: torch.Tensor,
    main: list[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Absorption fraction [N] and full absorption [N] (bool) of N words, from their latents z [N, S],
    each latent's contribution c [N, S] (`latent_projections`), its decoder's cos with the probe [S],
    the activations' probe projection a [N] and the main latents (definitions: module docstring)."""
    n_latents = contributions.shape[1]
    is_main = torch.zeros(n_latents, dtype=torch.bool)
    is_main[main] = True
    m = contributions[:, is_main].sum(-1)
    candidates = contributions.masked_fill(is_main | (cos < FRACTION_COS), 0).clamp(min=0)
    absorbed = candidates.topk(min(MAX_ABSORBERS, n_latents), dim=-1).values.sum(-1)
    credited = torch.minimum(absorbed, projection - m)
    fraction = (credited / (credited + m)).nan_to_num(0.0).clamp(0, 1)
    fraction = torch.where(m <= 0, torch.ones_like(fraction), fraction)
    no_absorption = (
        (m >= projection) | (projection <= 0) | (absorbed < PROJECTION_SHARE * projection)
    )
    fraction = torch.where(no_absorption, torch.zeros_like(fraction), fraction)

    top = contributions.argmax(-1)
    main_silent = (codes[:, is_main] <= 0).all(-1)
    top_share = contributions.gather(1, top[:, None])[:, 0]
    full = (
        main_silent
        & (projection > 0)
        & (cos[top] >= FULL_COS)
        & (top_share >= PROJECTION_SHARE * projection)
    )
    return fraction, full


@torch.no_grad()
def first_letter_absorption(sae, data: LetterData, seed: int = 0) -> dict:
    """Mean absorption fraction and full-absorption rate of `sae` over the letters its ground-truth
    probe finds (F1 > 0.6), with the per-letter figures; see the module docstring."""
    was_training = sae.training
    sae.eval()
    try:
        probe_w, probe_b = train_multi_probe(
            data.acts[data.train], data.labels[data.train], seed=seed
        )
        test_acts, test_labels = data.acts[data.test], data.labels[data.test]
        probe_scores = test_acts @ probe_w.T + probe_b
        codes_train, codes_test = sae.encode(data.acts[data.train]), sae.encode(test_acts)
        main, sparse_f1 = k_sparse_main_latents(
            codes_train, data.labels[data.train], codes_test, test_labels, seed=seed
        )
        letters = {}
        for c, letter in enumerate(LETTERS):
            letters[letter] = _letter_result(
                sae,
                c,
                test_acts,
                test_labels,
                codes_test,
                probe_scores[:, c],
                probe_w[c],
                main[c],
                sparse_f1[c],
            )
    finally:
        sae.train(was_training)
    scored = [
        r for r in letters.values() if r["probe_f1"] > MIN_PROBE_F1 and r["probe_true_positives"]
    ]
    mean = (
        (lambda key: float(np.mean([r[key] for r in scored])))
        if scored
        else (lambda key: float("nan"))
    )
    return {
        "mean_absorption_fraction_score": mean("mean_absorption_fraction"),
        "mean_full_absorption_score": mean("full_absorption_rate"),
        "mean_num_main_latents": mean("num_main_latents"),
        "letters_scored": len(scored),
        "words": len(data.words),
        "test_words": len(data.test),
        "caveat": CAVEAT,
        "letters": letters,
    }


def _letter_result(
    sae, c, test_acts, test_labels, codes_test, scores, probe_weight, main, sparse_f1
) -> dict:
    truth = test_labels == c
    detected = truth & (scores > 0)
    result = {
        "probe_f1": f1_score(scores > 0, truth),
        "sparse_f1_by_k": sparse_f1,
        "main_latents": main,
        "num_main_latents": len(main),
        "probe_true_positives": int(detected.sum()),
    }
    if not detected.any():
        return {**result, "mean_absorption_fraction": 0.0, "full_absorption_rate": 0.0}
    acts = test_acts[detected]
    unit = probe_weight / probe_weight.norm()
    contributions, cos = latent_projections(sae, acts, probe_weight)
    fraction, full = absorption_scores(
        codes_test[detected], contributions, cos, acts.float() @ unit, main
    )
    return {
        **result,
        "mean_absorption_fraction": fraction.mean().item(),
        "full_absorption_rate": full.float().mean().item(),
    }
