"""A spec's models against what their backends claim to support, at plan time.

    check_backends(spec, {e.name: e.supports for e in REGISTRY.values()})   # harness.plan

The schema accepts the registry's backend names; this checks each model against the claims its
backends make (`harness.vocab.Supports`): the model kind, every layer type, activation and
initializer, the base network, the optimizer, and training. A backend that declares no claims
(None: an entry-point backend) is not checked. Raises `UserError` naming the spec file and the
field; returns nothing.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from harness.errors import UserError
from harness.spec.schema import Model, PretrainedModel, RandomModel, SequentialModel, Spec
from harness.vocab import CATEGORY_NAMES, Supports


def needs(model: Model, index: int) -> Iterator[tuple[str, str, str]]:
    """(category, name, spec path) of every vocabulary name the model uses."""
    where = f"models[{index}]"
    yield "kinds", model.kind, f"{where}.kind"
    if isinstance(model, RandomModel):
        return
    if isinstance(model, PretrainedModel):
        yield "bases", model.base.name, f"{where}.base.name"
    field = "layers" if isinstance(model, SequentialModel) else "head"
    layers = model.layers if isinstance(model, SequentialModel) else model.head
    for i, layer in enumerate(layers):
        at = f"{where}.{field}[{i}]"
        yield "layers", layer.type, at
        for key, value in layer:
            if key == "activation":
                yield "activations", value, f"{at}.activation"
            elif key.endswith("_initializer"):
                yield "initializers", value, f"{at}.{key}"
    yield "optimizers", model.train.optimizer.name, f"{where}.train.optimizer.name"


def check_backends(spec: Spec, claims: Mapping[str, Supports | None]) -> None:
    """Every backend a model names supports what the model uses (a backend without claims, or
    not in `claims`, is not checked: the schema already accepts only the registry's names)."""
    for i, model in enumerate(spec.models):
        for j, name in enumerate(model.backends):
            supports = claims.get(name)
            if supports is None:
                continue
            where = f"{spec.source}: models[{i}].backends[{j}]"
            claimed = supports.claims()
            for category, used, path in needs(model, i):
                if used not in claimed[category]:
                    allowed = ", ".join(claimed[category]) or "none"
                    raise UserError(
                        f"{where}: backend '{name}' does not support {CATEGORY_NAMES[category]} "
                        f"'{used}' ({path}); it supports: {allowed}"
                    )
                if category == "kinds" and not isinstance(model, RandomModel) \
                        and not supports.trains:
                    raise UserError(
                        f"{where}: backend '{name}' builds and predicts only; model "
                        f"'{model.name}' trains (models[{i}].train)"
                    )
