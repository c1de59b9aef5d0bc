"""``python -m train.main --print_config``: the resolved config, every field under its comment.

The comments are read from the source that defines each field, where the field is documented
once: the ``# ...`` lines above ``t.steps = ...`` in ``configs/base.py`` (sections ``train``,
``mesh``, ``kernels`` and the section comments), above ``c.<field> = ...`` in
``train/data.py:default_data_config`` and ``train/optimizer.py:default_optimizer_config``, and
the comments on or above each field of ``model/config.py:ModelConfig`` (``YarnConfig`` for
``model.yarn.*``). A field without a comment is printed bare.
"""

from __future__ import annotations

import inspect
import re
import textwrap

_TARGETS = re.compile(r"^\s*((?:[A-Za-z_][\w.]*\s*=(?!=)\s*)+)")  # `t.steps = 1000`, `m = c.mesh = ...`
_FIELD = re.compile(r"^\s*(\w+)\s*:\s*[^=]+=[^#]*(?:#\s*(.*))?$")  # `d_model: int = 128  # d (hidden_size)`


def _comments_above_assignments(source: str, prefixes: dict[str, str]) -> dict[str, str]:
    """``{dotted name: comment}`` for each ``<prefix><name> = ...`` line preceded by ``# ...`` lines;
    ``prefixes`` maps a source prefix (``"t."``) to the config path it stands for (``"train."``)."""
    out, block = {}, []
    for line in source.splitlines():
        s = line.strip()
        if s.startswith("#"):
            block.append(s.lstrip("#").strip())
            continue
        m = _TARGETS.match(line)
        if m and block:
            name = _name(m.group(1).replace(" ", "").split("=")[:-1], prefixes)
            if name is not None:
                out.setdefault(name, " ".join(block))
        block = []
    return out


def _name(targets: list[str], prefixes: dict[str, str]) -> str | None:
    for lhs in targets:
        for src, dst in sorted(prefixes.items(), key=lambda kv: -len(kv[0])):
            if lhs.startswith(src) and "." not in lhs[len(src) :]:
                return dst + lhs[len(src) :]
    return None


def _dataclass_comments(cls, prefix: str) -> dict[str, str]:
    out, block = {}, []
    for line in inspect.getsource(cls).splitlines():
        s = line.strip()
        if s.startswith("#"):
            if not s.startswith("# ---"):
                block.append(s.lstrip("#").strip())
            continue
        m = _FIELD.match(line)
        if m and not s.startswith(("def ", "@", "class ")):
            text = " ".join(block + ([m.group(2).strip()] if m.group(2) else []))
            if text:
                out[prefix + m.group(1)] = text
        block = []
    return out


def field_comments() -> dict[str, str]:
    """``{"train.steps": "Optimizer steps to run.", ...}`` for every documented field."""
    import configs.base as base
    from model.config import Llama3RopeConfig, ModelConfig, YarnConfig
    from train.data import default_data_config
    from train.optimizer import default_optimizer_config

    out = _comments_above_assignments(
        inspect.getsource(base.build),
        {"c.": "", "t.": "train.", "m.": "mesh.", "c.kernels.": "kernels.", "c.model.": "model."},
    )
    out.update(_comments_above_assignments(inspect.getsource(default_data_config), {"c.": "data."}))
    out.update(_comments_above_assignments(inspect.getsource(default_optimizer_config), {"c.": "optimizer."}))
    out.update(_dataclass_comments(ModelConfig, "model."))
    out.update(_dataclass_comments(YarnConfig, "model.yarn."))
    out.update(_dataclass_comments(Llama3RopeConfig, "model.llama3_rope."))
    out["kernels.impl"] = out.get("kernels", "")  # `c.kernels = ConfigDict({"impl": ...})` under its comment
    out.pop("kernels", None)
    return out


def format_config(config, comments: dict[str, str] | None = None, width: int = 100) -> str:
    """Every leaf as ``section.field = value`` (``--config.<...>`` takes the same spelling), with its
    comment above it; one blank line between sections."""
    comments = field_comments() if comments is None else comments
    lines = []

    def walk(node, prefix):
        for key in node.keys():
            value, path = node[key], f"{prefix}{key}"
            if hasattr(value, "keys") and not prefix:
                lines.append("")  # a blank line before each section
            lines.extend(textwrap.wrap(comments.get(path, ""), width, initial_indent="# ", subsequent_indent="# "))
            if hasattr(value, "keys"):
                walk(value, path + ".")
            else:
                lines.append(f"{path} = {value!r}")

    walk(config, "")
    return "\n".join(lines).strip() + "\n"
