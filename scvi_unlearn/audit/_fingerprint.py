"""SHA-256 fingerprints that tie an audit to the exact model, cells and counts it judged.

A certificate attached to a consent-withdrawal record must say *which* model was audited on
*which* cells; these hashes let anyone holding the same files check that.
"""

from __future__ import annotations

import hashlib
import platform
from datetime import UTC, datetime
from importlib.metadata import version

import numpy as np
import torch
from scipy import sparse

from scvi_unlearn._utils import package_version


def weights_sha256(model) -> str:
    """SHA-256 of a model's weights: every state-dict tensor, in sorted key order.

    Each entry contributes its name, dtype, shape and raw bytes, so renaming, reshaping or
    changing any single weight changes the hash.
    """
    module = getattr(model, "module", model)
    h = hashlib.sha256()
    state = module.state_dict()
    for key in sorted(state):
        tensor = state[key].detach().cpu().contiguous()
        h.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16: hash its bit pattern
            tensor = tensor.view(torch.int16)
        h.update(tensor.numpy().tobytes())
    return h.hexdigest()


def cells_sha256(names) -> str:
    """SHA-256 of a list of cell names, newline-joined in the given order."""
    return hashlib.sha256("\n".join(map(str, names)).encode()).hexdigest()


def counts_sha256(adata, layer: str | None = None) -> str:
    """SHA-256 of an AnnData's cell names, gene names and count matrix (no copy of it)."""
    h = hashlib.sha256()
    h.update(cells_sha256(adata.obs_names).encode())
    h.update(cells_sha256(adata.var_names).encode())
    x = adata.X if layer is None else adata.layers[layer]
    h.update(f"{getattr(x, 'dtype', '')}|{tuple(x.shape)}|".encode())
    if sparse.issparse(x):
        x = x if x.format == "csr" else x.tocsr()
        for part in (x.indptr, x.indices, x.data):
            h.update(memoryview(np.ascontiguousarray(part)).cast("B"))
    else:
        h.update(memoryview(np.ascontiguousarray(np.asarray(x))).cast("B"))
    return h.hexdigest()


def package_versions() -> dict[str, str]:
    """Versions of the packages an audit's numbers depend on."""
    return {
        "scvi_unlearn": package_version(),
        **{name: version(name) for name in ("scvi-tools", "torch", "anndata", "numpy")},
        "python": platform.python_version(),
    }


def utc_now() -> str:
    """The current UTC time, ISO 8601 to the second."""
    return datetime.now(UTC).replace(microsecond=0).isoformat()
