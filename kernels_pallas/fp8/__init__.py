"""Fine-grained (1x128 / 128x128 block-scaled) fp8 and int8 quantization and matmuls."""

from kernels_pallas.fp8.kernel import BlockSizes
from kernels_pallas.fp8.ops import (
    fp8_matmul,
    grouped_fp8_matmul,
    grouped_prequantized_matmul,
    grouped_scaled_matmul,
    quantize_activations,
    quantize_weights,
    scaled_matmul,
)
