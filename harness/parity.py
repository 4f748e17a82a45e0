"""Weight-port parity: proof that two backends compute the same model, layer by layer.

    python -m harness parity specs/paper.yaml [--models cnn] [--backends keras,torch] [--steps 3]

For each model and each backend after the first (the source), in separate processes (never two
frameworks in one): the source builds the model from the first seed and writes its weights in
the neutral layout (.npz, backends/base.py); the target loads them. Both then run, on the same
real cached test images, in inference mode: every spec layer's activation (and a pretrained
base's blocks), and the output probabilities; then K training steps from those weights on the
same batches (the harness's stream of the first seed, augmentation parameters included), with
dropout disabled for the check: the loss of each step, every variable's step-1 gradient, and
the trainable weights after each step.

Verdicts (float32 on CPU): forward passes when the output probabilities agree within
`FORWARD_TOL` absolute; the first layer whose difference exceeds `LAYER_TOL` of its magnitude
is named either way. Training passes when every step-1 gradient agrees within `GRAD_TOL`
relative (norm of the difference over the norm). Later steps are reported, not asserted: they
drift apart through float non-associativity, and the report shows by how much.
Results go to results/<spec>/parity.json; the report's "Parity" section renders them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from harness.errors import UserError
from harness.spec import Dropout, Model, PretrainedModel, RandomModel, SequentialModel, Spec

FORWARD_TOL = 1e-5  # output probabilities, absolute
LAYER_TOL = 1e-4  # a layer's max |difference| over its max |value|
GRAD_TOL = 1e-4  # ||g_a - g_b|| / ||g_a|| per variable, step 1
PROBE_IMAGES = 16
SCHEMA = 1


@dataclass(frozen=True)
class LayerDiff:
    name: str
    max_abs: float
    rel: float  # max_abs / max |source value|


@dataclass(frozen=True)
class GradDiff:
    name: str
    norm: float  # of the source's gradient
    rel: float


@dataclass(frozen=True)
class StepDiff:
    step: int
    loss_source: float
    loss_target: float
    weights_max_abs: float  # largest difference of any trainable weight after the step


@dataclass(frozen=True)
class PairParity:
    """One model, source -> target."""

    model: str
    source: str
    target: str
    status: str  # pass | fail | not portable | failed
    reason: str | None = None
    output_max_abs: float | None = None
    forward_pass: bool | None = None
    first_divergent: str | None = None  # first layer above LAYER_TOL
    layers: tuple[LayerDiff, ...] = ()
    training_pass: bool | None = None
    worst_gradient: GradDiff | None = None
    gradients: tuple[GradDiff, ...] = ()
    steps: tuple[StepDiff, ...] = ()


@dataclass(frozen=True)
class ParityResult:
    spec: str
    seed: int
    steps: int
    images: int
    augmentation: bool
    tolerances: dict[str, float] = field(
        default_factory=lambda: {"forward": FORWARD_TOL, "layer": LAYER_TOL, "gradient": GRAD_TOL}
    )
    pairs: tuple[PairParity, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"schema": SCHEMA, **asdict(self)}

    @property
    def passed(self) -> bool:
        return all(p.status in ("pass", "not portable") for p in self.pairs)


def without_dropout(model: Model) -> Model:
    """The model with every dropout rate 0: the check compares arithmetic, not random masks."""

    def strip(layers: tuple[Any, ...]) -> tuple[Any, ...]:
        return tuple(
            layer.model_copy(update={"rate": 0.0}) if isinstance(layer, Dropout) else layer
            for layer in layers
        )

    if isinstance(model, SequentialModel):
        return model.model_copy(update={"layers": strip(model.layers)})
    if isinstance(model, PretrainedModel):
        return model.model_copy(update={"head": strip(model.head)})
    return model


# ---------------------------------------------------------------------------------------------
# Comparison (pure)


def _max_abs(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b))) if a.size else 0.0


def compare(source: dict[str, np.ndarray], target: dict[str, np.ndarray], model: str,
            names: tuple[str, str], steps: int) -> PairParity:
    """Compare two probes' arrays (keys act/..., probs, loss, grad/..., step<k>/...)."""
    layers = []
    for key in source:
        if not key.startswith("act/"):
            continue
        a, b = source[key], target.get(key)
        if b is None or a.shape != b.shape:
            found = "missing" if b is None else f"shape {b.shape} (source {a.shape})"
            return PairParity(model, *names, "fail", f"layer {key[4:]}: {found}")
        d = _max_abs(a, b)
        layers.append(LayerDiff(key[4:], d, d / max(float(np.max(np.abs(a))), 1e-30)))
    output = _max_abs(source["probs"], target["probs"])
    first = next((lay.name for lay in layers if lay.rel > LAYER_TOL), None)
    grads = []
    for key in source:
        if key.startswith("grad/"):
            a, b = source[key], target[key]
            norm = float(np.linalg.norm(a))
            grads.append(GradDiff(key[5:], norm, float(np.linalg.norm(a - b)) / max(norm, 1e-30)))
    step_diffs = []
    for k in range(steps):
        prefix = f"step{k + 1}/"
        worst = max(
            (_max_abs(source[key], target[key]) for key in source if key.startswith(prefix)),
            default=0.0,
        )
        losses = float(source["loss"][k]), float(target["loss"][k])
        step_diffs.append(StepDiff(k + 1, *losses, worst))
    forward_pass = output <= FORWARD_TOL
    worst_grad = max(grads, key=lambda g: g.rel) if grads else None
    training_pass = worst_grad is None or worst_grad.rel <= GRAD_TOL
    return PairParity(
        model, *names,
        status="pass" if forward_pass and training_pass else "fail",
        output_max_abs=output,
        forward_pass=forward_pass,
        first_divergent=first,
        layers=tuple(layers),
        training_pass=training_pass,
        worst_gradient=worst_grad,
        gradients=tuple(grads),
        steps=tuple(step_diffs),
    )


# ---------------------------------------------------------------------------------------------
# The probe: one backend in its own process


def probe(job: dict[str, Any]) -> None:
    """Build (or load weights), then activations, probabilities and training steps -> .npz."""
    from backends.base import Batch, ModelInput
    from backends.registry import create

    spec = Spec.model_validate(job["spec"])
    model = without_dropout(spec.model(job["model"]))
    backend = create(job["backend"], device="cpu", deterministic=True)
    backend.seed(job["seed"], True)
    handle = backend.build(
        model, ModelInput(spec.data.image_size, spec.data.channels, spec.normalization(model))
    )
    if job["weights_in"]:
        backend.set_weights(handle, dict(np.load(job["weights_in"])))
    else:
        np.savez(job["weights_out"], **backend.get_weights(handle))
    inputs = np.load(job["inputs"])
    out: dict[str, np.ndarray] = {
        f"act/{k}": v for k, v in backend.activations(handle, inputs["probe"]).items()
    }
    out["probs"] = backend.predict(handle, inputs["probe"])
    losses: list[float] = []
    trainable: list[str] = []
    for k in range(job["steps"]):
        batch = Batch(*(inputs[f"b{k}/{f}"] for f in ("images", "labels", "angle", "scale",
                                                        "hflip", "vflip")),
                      augment=bool(inputs["augment"]))
        result = backend.train_step(handle, batch, gradients=k == 0)()
        losses.append(result.loss)
        if result.gradients is not None:
            trainable = list(result.gradients)
            out.update({f"grad/{name}": g for name, g in result.gradients.items()})
        weights = backend.get_weights(handle)
        out.update({f"step{k + 1}/{name}": weights[name] for name in trainable})
    out["loss"] = np.asarray(losses, np.float64)
    np.savez(job["out"], **out)


def _run_probe(job: dict[str, Any], work: Path, log: Path) -> str | None:
    """Start one probe process; None when it worked, else the reason (its stderr's last line)."""
    path = work / f"{job['backend']}.{job['model']}.job.json"
    path.write_text(json.dumps(job), encoding="utf-8")
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env["CUDA_VISIBLE_DEVICES"] = ""  # the tolerances are float32 on CPU
    with open(log, "a", encoding="utf-8") as err:
        rc = subprocess.call([sys.executable, "-m", "harness.parity", str(path)],
                             stdout=err, stderr=err, env=env)
    if rc == 0:
        return None
    lines = [ln for ln in log.read_text(encoding="utf-8", errors="replace").splitlines() if ln]
    return lines[-1] if lines else f"exit code {rc}"


def run_parity(spec: Spec, data: Any, models: list[str] | None, backends: list[str] | None,
               steps: int, log: Path) -> ParityResult:
    """Every (model, source -> target) pair; `data` is the prepared data of the spec."""
    from backends.registry import missing_modules

    chosen = [m for m in spec.models if not isinstance(m, RandomModel)
              and (not models or m.name in models)]
    if models:
        unknown = sorted(set(models) - {m.name for m in spec.models})
        if unknown:
            raise UserError(f"--models: unknown model '{unknown[0]}'; this spec has: "
                            f"{', '.join(m.name for m in spec.models)}")
    seed = spec.seeds[0]
    test = np.sort(data.split.test)[:PROBE_IMAGES]
    labels = data.table["label"].to_numpy().astype(np.float32)
    pairs: list[PairParity] = []
    with tempfile.TemporaryDirectory(prefix="harness-parity-") as tmp:
        work = Path(tmp)
        for model in chosen:
            names = backends or [b for b in model.backends if not missing_modules(b)]
            if len(names) < 2:
                pairs.append(PairParity(model.name, names[0] if names else "-", "-",
                                        "failed", "needs two installed backends"))
                continue
            from backends.base import TrainData

            train = TrainData(data.cache.images, np.sort(data.split.train),
                              labels[np.sort(data.split.train)], spec.augmentation, seed,
                              model.train.shuffle)  # type: ignore[union-attr]
            inputs: dict[str, np.ndarray] = {
                "probe": np.asarray(data.cache.images[test]),
                "augment": np.asarray(spec.augmentation.enabled),
            }
            for k, batch in zip(range(steps), train.batches(1, model.train.batch_size),  # type: ignore[union-attr]
                                strict=False):
                for f in ("images", "labels", "angle", "scale", "hflip", "vflip"):
                    inputs[f"b{k}/{f}"] = getattr(batch, f)
            np.savez(work / f"{model.name}.inputs.npz", **inputs)
            base = {"spec": spec.model_dump(mode="json"), "model": model.name, "seed": seed,
                    "inputs": str(work / f"{model.name}.inputs.npz"), "steps": steps,
                    "weights_in": None, "weights_out": str(work / f"{model.name}.weights.npz")}
            src = names[0]
            why = _run_probe({**base, "backend": src, "out": str(work / f"{src}.npz")}, work, log)
            for tgt in names[1:]:
                if why is None:
                    job = {**base, "backend": tgt, "weights_out": None,
                           "weights_in": base["weights_out"], "out": str(work / f"{tgt}.npz")}
                    reason = _run_probe(job, work, log)
                else:
                    reason = why
                if reason is not None:
                    portable = "no exact counterpart" in reason or "no neutral" in reason
                    pairs.append(PairParity(model.name, src, tgt,
                                            "not portable" if portable else "failed", reason))
                    continue
                a, b = np.load(work / f"{src}.npz"), np.load(work / f"{tgt}.npz")
                pairs.append(compare({k: a[k] for k in a.files}, {k: b[k] for k in b.files},
                                     model.name, (src, tgt), steps))
    return ParityResult(spec.name, seed, steps, len(test), bool(spec.augmentation.enabled),
                        pairs=tuple(pairs))


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.2e}"


def render_parity(result: dict[str, Any]) -> str:
    """The report's "Parity" section from parity.json (a dict): one table per model pair."""
    tol = result["tolerances"]
    lines = [
        "## Parity: do the backends compute the same model?",
        "",
        f"Weights built by the first backend (seed {result['seed']}) are ported to the other "
        f"in the neutral layout; both run {result['images']} cached test images in inference "
        f"mode, then {result['steps']} training steps from the same weights on the same "
        f"batches (augmentation {'on' if result['augmentation'] else 'off'}, dropout off). "
        f"Forward passes when the output probabilities agree within {tol['forward']:g} "
        f"absolute; training when every step-1 gradient agrees within {tol['gradient']:g} "
        f"relative. The first layer whose difference exceeds {tol['layer']:g} of its "
        "magnitude is named. Later steps are shown, not asserted.",
        "",
        "| model | source -> target | status | output max abs diff | first divergent layer "
        "| worst step-1 gradient (rel) | loss per step (source / target) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for p in result["pairs"]:
        worst = p.get("worst_gradient")
        grad = f"{worst['name']}: {worst['rel']:.2e}" if worst else "-"
        losses = "; ".join(f"{s['loss_source']:.6f} / {s['loss_target']:.6f}"
                           for s in p.get("steps", ())) or "-"
        status = p["status"] + (f" ({p['reason']})" if p.get("reason") else "")
        lines.append(f"| {p['model']} | {p['source']} -> {p['target']} | {status} | "
                     f"{_fmt(p.get('output_max_abs'))} | {p.get('first_divergent') or 'none'} | "
                     f"{grad} | {losses} |")
    for p in result["pairs"]:
        if not p.get("layers"):
            continue
        lines += ["", f"<details><summary>{p['model']}: {p['source']} -> {p['target']}, per "
                  "layer and per step</summary>", "",
                  "| layer | max abs diff | relative |", "| --- | --- | --- |"]
        lines += [f"| {lay['name']} | {lay['max_abs']:.2e} | {lay['rel']:.2e} |"
                  for lay in p["layers"]]
        lines += ["", "| step | weights max abs diff after the step |", "| --- | --- |"]
        lines += [f"| {s['step']} | {s['weights_max_abs']:.2e} |" for s in p["steps"]]
        lines += ["", "</details>"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    probe(json.loads(Path(argv[0]).read_text(encoding="utf-8")))
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # leave without waiting on framework threads
