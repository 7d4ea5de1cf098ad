"""Data: a synthetic PBMC generator, real-data loaders, forget sets and membership splits."""

from scvi_unlearn.data._forget import (
    donor_forget_set,
    parse_forget_spec,
    read_cell_list,
    scattered_forget_set,
    structured_forget_set,
)
from scvi_unlearn.data._loaders import kang2018, pbmc3k
from scvi_unlearn.data._split import MembershipSplit, membership_split, validation_split
from scvi_unlearn.data._synthetic import synthetic_pbmc

__all__ = [
    "MembershipSplit",
    "donor_forget_set",
    "kang2018",
    "membership_split",
    "parse_forget_spec",
    "pbmc3k",
    "read_cell_list",
    "scattered_forget_set",
    "structured_forget_set",
    "synthetic_pbmc",
    "validation_split",
]
