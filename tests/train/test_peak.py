"""The MFU denominator: config value, datasheet table, measured CPU fallback."""

import pytest

from train import peak


def test_config_value_wins():
    assert peak.peak_flops(1e15, device_kind="TPU v5", dtype="bfloat16") == (1e15, "config")


@pytest.mark.parametrize(
    "kind, dtype, tflops, where",
    [
        ("TPU v4", "bfloat16", 275, "tpu/docs/v4"),
        ("TPU v5 lite", "bfloat16", 197, "v5e"),
        ("TPU v5", "bfloat16", 459, "v5p"),  # v5p reports itself as "TPU v5", a prefix of "TPU v5 lite"
        ("TPU v6 lite", "float32", 918, "v6e"),
        ("NVIDIA A100-SXM4-80GB", "bfloat16", 312, "a100"),
        ("NVIDIA A100-SXM4-80GB", "float32", 156, "a100"),  # TF32
        ("NVIDIA H100 80GB HBM3", "bfloat16", 989.4, "SXM"),
        ("NVIDIA H100 PCIe", "bfloat16", 756, "tensor-core"),  # listed before the SXM "H100" pattern
        ("NVIDIA H200", "bfloat16", 989.4, "h200"),
    ],
)
def test_datasheet_table(kind, dtype, tflops, where):
    value, source = peak.peak_flops(None, device_kind=kind, dtype=dtype)
    assert value == pytest.approx(tflops * 1e12)
    assert source.startswith(f"datasheet: {kind}, {dtype}") and where in source


def test_cpu_falls_back_to_a_labelled_measurement():
    value, source = peak.peak_flops(None, device_kind="cpu", dtype="float32")
    assert value > 0 and source.startswith("measured: f32 1024x1024 matmul per CPU-second")
    half, source2 = peak.peak_flops(None, device_kind="cpu", dtype="float32", local_devices=2)
    assert half == pytest.approx(value / 2) and source2.endswith("/ 2 devices")
    # a listed accelerator with a dtype it has no entry for is measured too, not guessed
    assert peak.datasheet_peak("TPU v5", "float16") is None
