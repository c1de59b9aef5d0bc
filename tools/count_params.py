"""Per-component parameter table of a config's model, from abstract shapes (nothing allocated).

  python -m tools.count_params --config=configs/deepseek_v3_671b.py

The last lines are machine-readable: ``total_params: N``, ``activated_params: N`` (main model, MTP
excluded) and ``mtp_params: N``.
"""

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
flags.mark_flags_as_required(["config"])


def _fmt(n: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def main(argv):
    del argv
    from model.config import ModelConfig
    from model.param_count import count_params

    cfg = ModelConfig.from_dict(_CONFIG.value.model.to_dict())
    c = count_params(cfg)
    width = max(len(k) for k in c["components"]) + 2
    print(f"{'component':<{width}}{'params':>16}{'':>10}")
    for name, n in c["components"].items():
        print(f"{name:<{width}}{n:>16,}{_fmt(n):>10}")
    print(f"{'mtp (own weights)':<{width}}{c['mtp_params']:>16,}{_fmt(c['mtp_params']):>10}")
    print(f"total_params: {c['total_params']}")
    print(f"activated_params: {c['activated_params']}")
    print(f"mtp_params: {c['mtp_params']}")


if __name__ == "__main__":
    app.run(main)
