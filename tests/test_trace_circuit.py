"""trace_circuit.py's own computations that need no circuit-tracer: the walk that measures how many
feature nodes a path of an attribution graph passes. (The script's steps that call circuit-tracer
run in its environment: tests/circuit_tracer_check.py, tests/circuit_tracer_clt_check.py.)"""

import pytest
import torch

from matryoshka_sae.cli.trace_circuit import walk_lengths


def graph(edges: dict[tuple[int, int], float], n_nodes: int) -> torch.Tensor:
    """adjacency [target, source] with the given (target, source) -> weight."""
    adjacency = torch.zeros(n_nodes, n_nodes)
    for (target, source), weight in edges.items():
        adjacency[target, source] = weight
    return adjacency


def test_a_chain_of_features_is_one_path_through_each():
    # nodes: features 0, 1, 2; token 3; logit 4. logit <- f2 <- f1 <- f0 <- token
    adjacency = graph({(4, 2): 1.0, (2, 1): -3.0, (1, 0): 0.5, (0, 3): 2.0}, 5)
    start = torch.tensor([0, 0, 0, 0, 1.0])
    lengths = walk_lengths(adjacency, 3, start)
    assert lengths["feature_nodes_per_path"] == pytest.approx(3.0)
    assert lengths["multi_hop_share"] == pytest.approx(1.0)
    assert lengths["feature_nodes_per_feature_path"] == pytest.approx(3.0)


def test_paths_are_weighted_by_their_share_of_absolute_edge_weight():
    # logit 4 reads the token directly (weight 1), feature 0 (weight -1) and feature 1 (weight 2);
    # feature 1 reads feature 0 (3) and the error node 2 (1); feature 0 reads the token 3.
    adjacency = graph(
        {(4, 3): 1.0, (4, 0): -1.0, (4, 1): 2.0, (1, 0): 3.0, (1, 2): 1.0, (0, 3): 1.0}, 5
    )
    start = torch.tensor([0, 0, 0, 0, 1.0])
    lengths = walk_lengths(adjacency, 2, start)
    # walks: direct 1/4 (0 features); via f0 1/4 (1); via f1: 2/4 x (3/4 -> f0 -> token: 2, 1/4 -> error: 1)
    expected = 0.25 * 0 + 0.25 * 1 + 0.5 * (0.75 * 2 + 0.25 * 1)
    assert lengths["feature_nodes_per_path"] == pytest.approx(expected)
    assert lengths["multi_hop_share"] == pytest.approx(0.5 * 0.75)
    # among the walks through a feature (weight 3/4): the same lengths over 3/4
    assert lengths["feature_nodes_per_feature_path"] == pytest.approx(expected / 0.75)
    assert lengths["multi_hop_share_of_feature_paths"] == pytest.approx(0.5 * 0.75 / 0.75)


def test_a_graph_without_feature_nodes_has_paths_of_none():
    adjacency = graph({(2, 0): 1.0, (2, 1): 1.0}, 3)  # logit 2 reads an error node and a token
    lengths = walk_lengths(adjacency, 0, torch.tensor([0, 0, 1.0]))
    assert lengths["feature_nodes_per_path"] == 0.0 and lengths["multi_hop_share"] == 0.0
    assert lengths["feature_nodes_per_feature_path"] == 0.0
