"""What the inner-product form buys: self-influence, valuation and group effects in one line each.

All of them use the loss as the query measurement, so that scores read as "how much does
training example i lower this loss": self-influence_i = ⟨−∇L_i-query(i), train(i)⟩, and the value
of i over a validation set V is Σ_{j∈V} ⟨query(v_j), train(i)⟩ = ⟨Σ_j query(v_j), train(i)⟩.
"""

from __future__ import annotations

import numpy as np

from attribution.data import as_examples
from attribution.errors import AttributionError
from attribution.methods.base import Method


def self_influence(method: Method, train: object, batch_rows: int = 4096) -> np.ndarray:
    """⟨query(i), train(i)⟩ for every training example (n,); high = suspicious (mislabels).

    ``train`` must be the set the method was fitted on, in the same order.
    """
    examples = as_examples(train, what="train")
    vectors = method.train_vectors()
    if len(examples) != vectors.shape[0]:
        raise AttributionError(
            f"self_influence needs the {vectors.shape[0]} training examples the method was "
            f"fitted on, got {len(examples)}"
        )
    out = np.empty(len(examples), dtype=np.float64)
    for start in range(0, len(examples), batch_rows):
        rows = slice(start, start + batch_rows)
        queries = method.query_vectors(examples.subset(np.arange(len(examples))[rows]), "loss")
        out[rows] = np.einsum("ij,ij->i", queries, vectors[rows].astype(np.float32))
    return out


def value(method: Method, validation: object) -> np.ndarray:
    """Data value of each training example over a validation set (n_train,): one mat-vec.

    value_i = Σ_j ⟨query(v_j), train(i)⟩, the predicted decrease of the summed validation loss
    due to example i; negative values mark examples that hurt.
    """
    queries = method.query_vectors(validation, "loss")
    return method.train_vectors().astype(np.float32) @ queries.sum(axis=0)


def group_effect(scores: np.ndarray, members: np.ndarray) -> np.ndarray:
    """Predicted effect of removing a group: minus the sum of its members' scores, per test."""
    members = np.asarray(members)
    if members.size == 0:
        raise AttributionError("a group needs at least one member")
    return -np.asarray(scores)[:, members].sum(axis=1)
