"""The featurizer version: bumped whenever the same method arguments featurize differently.

Stored train vectors and freshly computed query vectors only live in the same space when both
came from the same featurizer. Indexes record this number (and a probe of real query vectors),
so a changed projection generator or gradient convention is caught instead of scoring garbage.

History: 1 — first release; 2 — Rademacher projections drawn from numpy's PCG64 bytes.
"""

FEATURIZER_VERSION = 2
