"""Grouped matmul (megablox-style) for dropless MoE expert FFNs."""

from kernels_pallas.gmm.kernel import BlockSizes
from kernels_pallas.gmm.ops import gmm, tgmm
from kernels_pallas.gmm.reference import gmm_reference, tgmm_reference
