"""Split one dense MLP into experts by what its neurons do on calibration text (`--split neurons`).

The recipe follows MoEfication and LLaMA-MoE, with the router made from the same clustering:

1. The tokens' MLP inputs (the output of the layer's post-attention norm, which is exactly what a
   router sees) are clustered into N groups by spherical k-means (scikit-learn's KMeans on unit
   vectors). Cluster e is "the kind of token expert e is for"; its unit centroid becomes router
   row e, so the untrained MoE already sends a token to the expert of its nearest centroid.
2. Each neuron j is scored for each cluster e: its mean contribution on the cluster's tokens,
   |silu(gate_j x) * up_j x| times the norm of its down-projection column.
3. Neurons go to experts by a balanced assignment that maximises the total score (scipy's
   linear_sum_assignment; each expert has I/N slots per round). With `rounds` r > 1 every neuron
   is placed r times, never twice in one expert, so an expert has r * I / N neurons: with K active
   experts of I / K neurons each, a token costs what the parent's MLP cost.
4. Shared experts (always on, as in DeepSeekMoE and Qwen-MoE) take the neurons with the highest
   mean contribution over all tokens first; the routed experts share out the rest.

Reproducing the parent: if every routed neuron sits in exactly r experts and each expert's down
projection is scaled by N / r, then all N experts active with equal router weights 1/N give the
parent's MLP output over those neurons exactly (each neuron's contribution is counted r times,
scaled by N / r, weighted 1/N); the shared experts add the rest (scaled by their gate's 1/sigmoid(0)).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from slimlm.errors import SlimlmError

if TYPE_CHECKING:  # torch is imported where it runs: the CLI builds its help from these modules
    import torch


def check_split(intermediate: int, experts: int, active: int, active_fraction: float,
                shared: int = 0) -> tuple[int, int]:
    """(neurons per expert, times each routed neuron is placed), or a one-line error saying what would work.

    K routed experts and S shared ones, all of `width` neurons, cost `active_fraction` of the parent's
    MLP: width = fraction * I / (S + K). The S * width most active neurons form the shared experts; the
    other R = I - S * width are placed `rounds` = N * width / R times over the N routed experts."""
    if not shared and intermediate % experts:
        fits = [n for n in range(max(active, 2), 65) if intermediate % n == 0]
        raise SlimlmError(f"--experts {experts} does not divide the parent's intermediate size {intermediate} "
                          f"(--split neurons needs equal experts): use one of {', '.join(map(str, fits))}")
    width = active_fraction * intermediate / (shared + active)
    routed = intermediate - shared * round(width)
    ok = abs(width - round(width)) < 1e-9 and routed > 0 and routed % experts == 0
    rounds = experts * round(width) / routed if ok else 0
    if not ok or abs(rounds - round(rounds)) > 1e-9 or not 1 <= round(rounds) <= experts:
        fracs = [f"{(shared + active) * u / intermediate:g}" for r in range(1, experts + 1)
                 for u in [_unit(intermediate, experts, shared, r)] if u]
        hint = f"use one of {', '.join(fracs)}" if fracs else "change --experts, --active or --shared-experts"
        raise SlimlmError(f"--active-fraction {active_fraction:g} with {experts} experts, {active} active"
                          + (f" and {shared} shared" if shared else "") + " does not split the parent's "
                          f"{intermediate} neurons into equal experts placing each neuron a whole number of times: "
                          + hint)
    return round(width), round(rounds)


def _unit(intermediate: int, experts: int, shared: int, rounds: int) -> int | None:
    """The expert width that places each routed neuron `rounds` times, if one exists."""
    # width * experts = rounds * (intermediate - shared * width)  ->  width = rounds * I / (N + rounds * S)
    width, rest = divmod(rounds * intermediate, experts + rounds * shared)
    if rest or not width or (intermediate - shared * width) % experts:
        return None
    return width


def mlp_activity(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, act) -> torch.Tensor:
    """[tokens, neurons]: each neuron's contribution size, |act(gate x) * up x| * ||down column||."""
    h = act(x @ gate.T) * (x @ up.T)
    return h.abs() * down.norm(dim=0)


def cluster_tokens(x: torch.Tensor, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(labels [tokens], unit centroids [n, hidden]) of spherical k-means on the MLP inputs."""
    import torch
    from sklearn.cluster import KMeans

    unit = torch.nn.functional.normalize(x.double(), dim=-1).numpy()
    km = KMeans(n_clusters=n, n_init=1, random_state=seed).fit(unit)  # one k-means++ start: a third of the time of three
    centroids = km.cluster_centers_
    centroids /= np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-12)
    return km.labels_, centroids


def cluster_scores(activity: torch.Tensor, labels: np.ndarray, n: int) -> np.ndarray:
    """[neurons, n]: mean contribution of each neuron on each cluster's tokens (0 for an empty cluster)."""
    a = activity.double().numpy()
    scores = np.zeros((a.shape[1], n))
    for e in range(n):
        members = labels == e
        if members.any():
            scores[:, e] = a[members].mean(axis=0)
    return scores


def assign_neurons(scores: np.ndarray, rounds: int) -> list[np.ndarray]:
    """Each expert's neuron indices (sorted): `rounds` balanced assignments of maximum total score,
    no neuron twice in one expert. scores: [neurons, experts]."""
    from scipy.optimize import linear_sum_assignment

    neurons, n = scores.shape
    per_round = neurons // n
    taken = np.zeros((neurons, n), dtype=bool)
    # A neuron already in an expert may not join it again: a cost above any achievable gain.
    forbid = (np.abs(scores).max() + 1.0) * neurons
    for _ in range(rounds):
        cost = np.where(taken, forbid, -scores)
        rows, cols = linear_sum_assignment(np.repeat(cost, per_round, axis=1))
        experts = cols // per_round
        if taken[rows, experts].any():  # cannot happen (a regular bipartite graph has a perfect matching)
            raise SlimlmError("neuron assignment failed: a neuron was placed twice in one expert")
        taken[rows, experts] = True
    return [np.flatnonzero(taken[:, e]) for e in range(n)]
