"""Comparing trained states (torch alone, so that tests/test_cuda.py can use it without conftest)."""

import torch


def assert_state_close(state: dict, expected_state: dict, rtol: float, what: str = "") -> None:
    """Every floating tensor of `expected_state` within `rtol` of `state`'s, relative in norm,
    |a - b| / |b| < rtol; every other tensor (counters) equal."""
    for key, expected in expected_state.items():
        if expected.is_floating_point():
            error = (state[key] - expected).norm() / expected.norm().clamp(min=1e-12)
            assert error < rtol, f"{what} {key}: relative difference {error:.2e}"
        else:
            assert torch.equal(state[key], expected), f"{what} {key}"
