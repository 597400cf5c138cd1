"""Measures of an attribution graph that circuit-tracer computed (`circuit_tracer.Graph`), beside
its own replacement and completeness scores: where the logits' direct inputs come from
(`logit_input_shares`), the error nodes' share of the logits' influence, how many feature nodes a
path back from the logits passes (`mean_path_length`), and the decoder vectors a graph's active
features hold. trace_circuit.py reports them; docs/transcoder_sets.md, "The tracing protocol",
says how to read them.

circuit_tracer is imported inside the functions that read its graph helpers: the rest runs on
plain tensors, in either environment.
"""

from __future__ import annotations

import torch


def error_influence_share(graph) -> float:
    """The share of the logits' total influence (circuit-tracer's node influence) held by error nodes."""
    from circuit_tracer.graph import compute_influence, normalize_matrix

    n_tokens, n_features = len(graph.input_tokens), len(graph.selected_features)
    error_end = n_features + n_tokens * graph.cfg.n_layers
    logit_weights = torch.zeros(
        graph.adjacency_matrix.shape[0], device=graph.adjacency_matrix.device
    )
    logit_weights[-len(graph.logit_targets) :] = graph.logit_probabilities
    influence = compute_influence(normalize_matrix(graph.adjacency_matrix), logit_weights)
    return (influence[n_features:error_end].sum() / influence[: error_end + n_tokens].sum()).item()


def mean_path_length(
    graph, node_threshold: float = 0.8, edge_threshold: float = 0.98
) -> dict[str, float]:
    """How many feature nodes a path of the pruned graph passes, from the logits back to a token or
    error node: the graph pruned as circuit-tracer's viewer prunes it (`prune_graph`), then
    `walk_lengths` from the logits weighted by their probabilities. Returns `walk_lengths`'s
    figures and the pruned graph's feature nodes."""
    from circuit_tracer.graph import prune_graph

    node_mask, edge_mask, _ = prune_graph(graph, node_threshold, edge_threshold)
    n_features, n_logits = len(graph.selected_features), len(graph.logit_targets)
    kept = edge_mask & node_mask[:, None] & node_mask[None, :]
    start = torch.zeros(graph.adjacency_matrix.shape[0])
    start[-n_logits:] = graph.logit_probabilities.float().cpu()
    lengths = walk_lengths(graph.adjacency_matrix.float().cpu() * kept.cpu(), n_features, start)
    return {**lengths, "pruned_feature_nodes": int(node_mask[:n_features].sum())}


def walk_lengths(adjacency: torch.Tensor, n_features: int, start: torch.Tensor) -> dict[str, float]:
    """A walk back through an attribution graph: adjacency [target, source] (circuit-tracer's
    layout: nodes 0..n_features-1 are features, the rest errors, tokens and logits), started with
    the weights `start` [nodes] (the logits' probabilities), stepping from each node to its sources
    in proportion to the absolute weights of its incoming edges, and ending at the first node that
    is not a feature (a token or error node, which have no incoming edges). Returns the expected
    number of feature nodes on the walk (`feature_nodes_per_path`; 1: one hop through one feature),
    the share of walks through two or more (`multi_hop_share`), and both among the walks through at
    least one feature (`feature_nodes_per_feature_path`, `multi_hop_share_of_feature_paths`): a
    graph whose logits read error nodes directly has short walks without being shallow."""
    steps = adjacency.abs()
    steps = steps / steps.sum(dim=1, keepdim=True).clamp(min=1e-10)
    mass = (start / start.sum()) @ steps  # the first step back from the logits
    ended = torch.zeros(n_features + 2)  # ended[k]: the weight of walks that end after k features
    for k in range(n_features + 1):
        ended[k] = mass[n_features:].sum()
        at_features = torch.zeros_like(mass)
        at_features[:n_features] = mass[:n_features]
        if at_features.sum() < 1e-9:
            break
        mass = at_features @ steps
    total = ended.sum().clamp(min=1e-12)
    counts = torch.arange(len(ended), dtype=ended.dtype)
    through_features = ended[1:].sum().clamp(min=1e-12)
    return {
        "feature_nodes_per_path": ((counts * ended).sum() / total).item(),
        "multi_hop_share": (ended[2:].sum() / total).item(),
        "feature_nodes_per_feature_path": ((counts * ended).sum() / through_features).item(),
        "multi_hop_share_of_feature_paths": (ended[2:].sum() / through_features).item(),
    }


def decoder_vectors(graph, n_layers: int, cross_layer: bool) -> int:
    """The decoder vectors of the graph's active features: one each for a set, L - j for a CLT feature of layer j."""
    if not cross_layer:
        return len(graph.active_features)
    return int((n_layers - graph.active_features[:, 0]).sum())


# ---------------------------------------------------------------------------------------------
# Where the logits' direct inputs come from
# ---------------------------------------------------------------------------------------------
#
# circuit-tracer 0.5.0's Graph (circuit_tracer/graph.py) orders its nodes as
#
#     [selected feature nodes | error nodes, layer-major: layer l at position p is
#      n_features + l * n_pos + p | token nodes, one per position | logit nodes]
#
# and adjacency[target, source] is the direct effect of the source on the target. Feature and error
# nodes of position 0 carry nothing: circuit-tracer zeroes both the features and the error vectors
# there, so position 0's MLP outputs enter no node at all.


def logit_input_shares(
    adjacency: torch.Tensor,
    n_features: int,
    n_layers: int,
    n_pos: int,
    logit_weights: torch.Tensor,
) -> dict[str, float]:
    """Where the logits' direct inputs come from, by node class.

    adjacency [N, N] (target, source) in circuit-tracer's node order (above), with N = n_features +
    (n_layers + 1) n_pos + n_logits; logit_weights [n_logits] (the logits' probabilities). Each
    logit row's absolute weights are normalised to sum to 1 and the rows averaged with weights
    w = logit_weights / sum(logit_weights):

        share(C) = sum_k w_k sum_{s in C} |A[k, s]| / sum_s |A[k, s]|

    (the first step of circuit-tracer's own influence walk from the logits). Returns the shares of
    the feature nodes (`feature_share`), of the error nodes after position 0 (`error_share`), of
    the token nodes (`token_share`) and of the error nodes at position 0 (`error_share_position_0`);
    they add up to 1."""
    tokens_start = n_features + n_layers * n_pos
    logits_start = tokens_start + n_pos
    if adjacency.shape[0] - logits_start != len(logit_weights):
        raise ValueError(
            f"adjacency has {adjacency.shape[0]} nodes: {n_features} features, {n_layers} x {n_pos} "
            f"errors and {n_pos} tokens leave {adjacency.shape[0] - logits_start} logits, "
            f"not {len(logit_weights)}"
        )
    rows = adjacency[logits_start:].abs().double()
    rows = rows / rows.sum(dim=1, keepdim=True).clamp(min=1e-30)
    weights = logit_weights.double().to(rows.device)
    into = (weights / weights.sum()) @ rows  # [N]: each node's share of the direct inputs
    errors = into[n_features:tokens_start].view(n_layers, n_pos)
    return {
        "feature_share": into[:n_features].sum().item(),
        "error_share": errors[:, 1:].sum().item(),
        "token_share": into[tokens_start:logits_start].sum().item(),
        "error_share_position_0": errors[:, 0].sum().item(),
    }


def graph_logit_input_shares(graph) -> dict[str, float]:
    """`logit_input_shares` of a circuit-tracer Graph, its keys prefixed with ``logit_input_``."""
    shares = logit_input_shares(
        graph.adjacency_matrix.float().cpu(),
        len(graph.selected_features),
        graph.cfg.n_layers,
        len(graph.input_tokens),
        graph.logit_probabilities.float().cpu(),
    )
    return {f"logit_input_{key}": value for key, value in shares.items()}
