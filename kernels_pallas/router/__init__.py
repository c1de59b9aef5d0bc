"""Fused DeepSeek-V3 router: scores, bias-adjusted group-limited top-k, gates, expert counts."""

from kernels_pallas.router.kernel import BlockSizes
from kernels_pallas.router.ops import route
from kernels_pallas.router.reference import RouterConfig, route_reference
