"""Sequential certification at given radii, and input-specific n: numpy/scipy only, no torch.

Two ways to spend fewer forward passes than a fixed n per input, both with CERTIFY's
guarantee (docs/sequential.md gives the proofs):

- `RadiiProcedure` (`radii`): is x certified at each of the radii r_1 < ... < r_m? Samples
  arrive in looks; an anytime-valid confidence sequence (`confidence`) for pA (and, for
  T-CERTIFY, for the runner-up) certifies a radius as soon as its lower bound passes
  Phi(r / sigma) and drops it as soon as it is provably out of reach; the input stops when
  every radius is decided.
- `choose_n` (`adaptive`): the radius-maximising protocol with n chosen per input from the n0
  selection counts alone, so that CERTIFY / T-CERTIFY then run unchanged on n fresh samples.

`smoothcert.sequential_sampling` draws the samples these decide on.
"""

from .adaptive import check_tolerance, choose_n
from .confidence import (
    CONFIDENCE_SEQUENCES,
    BetaMixture,
    BonferroniCP,
    ConfidenceSequence,
    make_confidence_sequence,
)
from .radii import (
    FINAL_SHARE,
    FUTILITY,
    SEQUENTIAL_METHODS,
    TABLE1_RADII,
    RadiiCertificate,
    RadiiProcedure,
    check_final_share,
    check_futility,
    check_precision,
    check_radii,
    reachable_radii,
)

__all__ = [
    "CONFIDENCE_SEQUENCES",
    "FINAL_SHARE",
    "FUTILITY",
    "SEQUENTIAL_METHODS",
    "TABLE1_RADII",
    "BetaMixture",
    "BonferroniCP",
    "ConfidenceSequence",
    "RadiiCertificate",
    "RadiiProcedure",
    "check_final_share",
    "check_futility",
    "check_precision",
    "check_radii",
    "check_tolerance",
    "choose_n",
    "make_confidence_sequence",
    "reachable_radii",
]
