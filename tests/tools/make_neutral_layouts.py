"""Write tests/data/neutral_layouts.json: every variable of Keras' pretrained bases, in the
neutral layout (backends/base.py), as {base: {name: shape}}; the torch backend must match it.

    KERAS_BACKEND=tensorflow python tests/tools/make_neutral_layouts.py

Random init (`weights: none`): names and shapes do not depend on the weights or the image size.
"""

from __future__ import annotations

import json
from pathlib import Path

from backends.base import ModelInput
from backends.registry import create
from harness.spec import load_spec

ROOT = Path(__file__).resolve().parents[2]
BASES = ("densenet121", "densenet169", "densenet201", "vgg16", "mobilenet_v2")


def main() -> None:
    backend = create("keras", device="cpu", deterministic=True)
    layouts = {}
    for base in BASES:
        spec = load_spec(
            ROOT / "specs" / "paper.yaml",
            ["data.image_size=32", f"models.densenet.base.name={base}",
             "models.densenet.base.weights=none", "models.densenet.printed_params=null",
             "models.densenet.normalization=tf"],
        )
        backend.seed(0, True)
        handle = backend.build(spec.model("densenet"), ModelInput(32, 3, "tf"))
        weights = backend.get_weights(handle)
        layouts[base] = {k: list(v.shape) for k, v in weights.items() if k.startswith(base + "/")}
        print(base, len(layouts[base]), "variables")
    out = ROOT / "tests" / "data" / "neutral_layouts.json"
    lines = []  # one variable a line, so a diff of this file reads as a diff of the layout
    for i, (base, layout) in enumerate(layouts.items()):
        rows = [f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in layout.items()]
        lines.append(f"{json.dumps(base)}: {{\n" + ",\n".join(rows) + "\n}")
        if i < len(layouts) - 1:
            lines[-1] += ","
    out.write_text("{\n" + "\n".join(lines) + "\n}\n")
    print("wrote", out)


if __name__ == "__main__":
    main()
