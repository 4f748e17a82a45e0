"""Weight-port parity: proof that two backends compute the same model, layer by layer.

    python -m harness parity specs/paper.yaml [--models cnn] [--backends keras,torch] [--steps 3]

For each model and each backend after the first (the source), in separate processes (never two
frameworks in one): the source builds the model from the first seed and writes its weights in
the neutral layout (.npz, backends/base.py); the target loads them. With dropout disabled for
the check, both then run:
- forward: on the same real cached test images, in inference mode, every spec layer's
  activation (and a pretrained base's blocks) and the output probabilities;
- gradient check: one training step from those weights on a seeded batch of uniform-noise
  images without augmentation, every variable's gradient;
- training: K steps from the same weights on the spec's own first batches (the harness's stream
  of the first seed, augmentation parameters included): the loss of each step, the step-1
  gradients and the trainable weights after each step.

Verdicts (CPU): forward passes when the float32 output probabilities agree within `FORWARD_TOL`
absolute; the first layer whose difference exceeds `LAYER_TOL` of its magnitude is named either
way. Training passes when every gradient of the check step agrees (norm of the difference over
the norm) within `GRAD64_TOL` computed in float64 in both backends (`Backend.gradients`: the
exact arithmetic, where a wrong port cannot hide behind rounding) AND within `GRAD_TOL` in
float32 (what training runs). Beside each, each backend's own float32 error (its float32 gradient
against its float64 one): a cross-framework float32 difference that one backend's error
explains is that backend's float32 numerics, not the port. The first variable from the output
back above either tolerance is named. The steps on the spec's batches are reported, not
asserted (the frameworks' bilinear interpolation for augmentation differs in the last float32
digits, and from step 2 on float non-associativity adds up); the report shows by how much.

Why float64 (measured on the demo CNN, keras -> torch, 4 noise images): float64 gradients agree
to 5e-15 .. 1e-13; Keras' float32 gradients are 1.6e-5 from its float64 ones at every layer.
torch's were 2e-3 off below maxpool2d_3: its channels_last BatchNorm kernel (training mode,
float32) computed statistics 30-300x less precisely than NCHW, which flipped the winner of one
near-tied max-pool window (float64 gap 1.4e-4 relative) at maxpool2d_3 and one at maxpool2d_4;
the old check's conditioning floor (weights moved by one rounding: 2.5e-6) could not see that.
Fixed in backends/torch_backend.py (BatchNorm2dNCHW): now 7e-7 from float64.

Results go to results/<spec>/parity.json; the report's "Parity" section renders them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from harness.errors import UserError
from harness.spec import Dropout, Model, PretrainedModel, RandomModel, SequentialModel, Spec

FORWARD_TOL = 1e-5  # output probabilities, absolute
LAYER_TOL = 1e-4  # a layer's max |difference| over its max |value|
GRAD_TOL = 1e-4  # ||g_a - g_b|| / ||g_a|| per variable, step 1, float32
GRAD64_TOL = 1e-10  # the same in float64 (measured: 5e-15 .. 1e-13 for the CNN)
PROBE_IMAGES = 16
CHECK_IMAGES = 4  # the gradient check batch: few max-pool windows, so few near-ties
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
    rel: float  # float32
    rel64: float | None = None  # the same difference in float64
    err32: float | None = None  # the larger of the backends' float32 errors (vs own float64)


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
    first_divergent_gradient: str | None = None  # from the output back, first above GRAD_TOL
    gradients: tuple[GradDiff, ...] = ()  # step 1 on the check batch: asserted
    real_gradients: tuple[GradDiff, ...] = ()  # step 1 on the spec's first batch: reported
    steps: tuple[StepDiff, ...] = ()


@dataclass(frozen=True)
class ParityResult:
    spec: str
    seed: int
    steps: int
    images: int
    augmentation: bool
    tolerances: dict[str, float] = field(
        default_factory=lambda: {"forward": FORWARD_TOL, "layer": LAYER_TOL, "gradient": GRAD_TOL,
                                 "gradient_float64": GRAD64_TOL}
    )
    method: str = (
        "forward: float32 inference on cached test images, output probabilities within "
        "tolerances.forward absolute; gradients: one step on seeded noise images, every "
        "variable's gradient computed in float64 in both backends (Backend.gradients) within "
        "tolerances.gradient_float64 relative and the float32 training step's within "
        "tolerances.gradient relative; err32 = each backend's float32 gradient against its own "
        "float64 one (the larger)"
    )
    pairs: tuple[PairParity, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"schema": SCHEMA, **asdict(self)}

    @property
    def passed(self) -> bool:
        return all(p.status in ("pass", "not portable") for p in self.pairs)


def _savez(path: str | Path, arrays: dict[str, np.ndarray]) -> None:
    np.savez(path, **arrays)  # type: ignore[arg-type]  # numpy's stub types **kwds as bool


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


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    """||a - b|| / ||a||."""
    return float(np.linalg.norm(a - b)) / max(float(np.linalg.norm(a)), 1e-30)


def _max_abs(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b))) if a.size else 0.0


def _grad_ok(g: GradDiff) -> bool:
    return g.rel <= GRAD_TOL and g.rel64 is not None and g.rel64 <= GRAD64_TOL


def _badness(rel: float, rel64: float | None) -> float:
    """How far a gradient is from failing: its worse difference over that one's tolerance."""
    return max(rel / GRAD_TOL, 0.0 if rel64 is None else rel64 / GRAD64_TOL)


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
    grads = [
        GradDiff(key[5:], float(np.linalg.norm(source[key])), _rel(source[key], target[key]),
                 _rel(source[f"grad64/{key[5:]}"], target[f"grad64/{key[5:]}"]),
                 max(_rel(source[f"grad64/{key[5:]}"], source[key]),
                     _rel(target[f"grad64/{key[5:]}"], target[key])))
        for key in source if key.startswith("grad/")
    ]
    real = [
        GradDiff(key[10:], float(np.linalg.norm(source[key])), _rel(source[key], target[key]))
        for key in source if key.startswith("real_grad/")
    ]
    # backward from the output: the first variable whose gradient is off
    first_grad = next((g.name for g in reversed(grads) if not _grad_ok(g)), None)
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
    worst_grad = max(grads, key=lambda g: _badness(g.rel, g.rel64)) if grads else None
    training_pass = all(_grad_ok(g) for g in grads)
    return PairParity(
        model, *names,
        status="pass" if forward_pass and training_pass else "fail",
        output_max_abs=output,
        forward_pass=forward_pass,
        first_divergent=first,
        layers=tuple(layers),
        training_pass=training_pass,
        worst_gradient=worst_grad,
        first_divergent_gradient=first_grad,
        gradients=tuple(grads),
        real_gradients=tuple(real),
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
    model_input = ModelInput(spec.data.image_size, spec.data.channels, spec.normalization(model))

    def fresh() -> Any:
        """The model with the source's weights and a new optimizer."""
        backend.seed(job["seed"], True)
        handle = backend.build(model, model_input)
        if job["weights_in"]:
            backend.set_weights(handle, dict(np.load(job["weights_in"])))
        return handle

    handle = fresh()
    if not job["weights_in"]:
        _savez(job["weights_out"], backend.get_weights(handle))
    inputs = np.load(job["inputs"])
    out: dict[str, np.ndarray] = {
        f"act/{k}": v for k, v in backend.activations(handle, inputs["probe"]).items()
    }
    out["probs"] = backend.predict(handle, inputs["probe"])

    def batch(prefix: str, augment: bool) -> Batch:
        def field(name: str) -> np.ndarray:
            return np.asarray(inputs[f"{prefix}/{name}"])

        return Batch(field("images"), field("labels"), field("angle"), field("scale"),
                     field("hflip"), field("vflip"), augment=augment)

    # the asserted check: one step on seeded noise images (no exact ties for max pooling to
    # break differently, no augmentation), from the ported weights
    # the exact reference: the same gradients in float64 on a copy (no update)
    out.update({f"grad64/{name}": g
                for name, g in backend.gradients(handle, batch("check", False)).items()})
    check = backend.train_step(handle, batch("check", False), gradients=True)()
    out.update({f"grad/{name}": g for name, g in (check.gradients or {}).items()})
    out["check_loss"] = np.asarray(check.loss)
    # the reported steps: the spec's own batches, augmentation as trained, from the same weights
    handle = fresh()
    losses: list[float] = []
    for k in range(job["steps"]):
        result = backend.train_step(handle, batch(f"b{k}", bool(inputs["augment"])),
                                    gradients=k == 0)()
        losses.append(result.loss)
        if result.gradients is not None:
            out.update({f"real_grad/{name}": g for name, g in result.gradients.items()})
        weights = backend.get_weights(handle)
        out.update({f"step{k + 1}/{name}": weights[name] for name in check.gradients or {}})
    out["loss"] = np.asarray(losses, np.float64)
    _savez(job["out"], out)


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


def _check_batch(n: int, size: int, seed: int) -> dict[str, np.ndarray]:
    """Seeded uniform-noise images, all labelled 1 (no cancelling per-sample gradients in the
    loss), no augmentation."""
    rng = np.random.default_rng(seed)
    return {
        "check/images": rng.integers(0, 256, (n, size, size), dtype=np.uint8),
        "check/labels": np.ones(n, np.float32),
        "check/angle": np.zeros(n, np.float32),
        "check/scale": np.ones(n, np.float32),
        "check/hflip": np.zeros(n, bool),
        "check/vflip": np.zeros(n, bool),
    }


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
            batches = train.batches(1, model.train.batch_size)  # type: ignore[union-attr]
            for k, batch in zip(range(steps), batches, strict=False):
                for f in ("images", "labels", "angle", "scale", "hflip", "vflip"):
                    inputs[f"b{k}/{f}"] = getattr(batch, f)
            inputs.update(_check_batch(CHECK_IMAGES, spec.data.image_size, seed))
            _savez(work / f"{model.name}.inputs.npz", inputs)
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


def _worst(grads: list[dict[str, Any]] | tuple[dict[str, Any], ...]) -> str:
    if not grads:
        return "-"
    g = max(grads, key=lambda d: _badness(d["rel"], d.get("rel64")))
    if g.get("rel64") is None:
        return f"{g['name']}: {g['rel']:.1e}"
    return f"{g['name']}: {g['rel']:.1e} (float64 {g['rel64']:.1e})"


def render_parity(result: dict[str, Any]) -> str:
    """The report's "Parity" section from parity.json (a dict): one row per model pair."""
    tol = result["tolerances"]
    lines = [
        "## Parity: do the backends compute the same model?",
        "",
        f"The first backend builds each model (seed {result['seed']}); its weights are ported "
        "to the other in the neutral layout, and both run with dropout off: "
        f"{result['images']} cached test images in inference mode (forward passes when the "
        f"output probabilities agree within {tol['forward']:g} absolute; the first layer "
        f"whose difference exceeds {tol['layer']:g} of its magnitude is named), one training "
        "step on seeded noise images (passes when every gradient agrees within "
        f"{tol.get('gradient_float64', float('nan')):g} relative computed in float64 in both "
        f"backends, the exact arithmetic, and within {tol['gradient']:g} in float32), and "
        f"{result['steps']} steps on the spec's own first batches (augmentation "
        f"{'on' if result['augmentation'] else 'off'}), reported, not asserted. The float32 "
        "error is each backend's float32 gradient against its own float64 one (the larger of "
        "the two): a float32 difference between backends that it explains comes from one "
        "backend's float32 numerics, not from the port.",
        "",
        "| model | source -> target | status | output max abs diff | first layer above "
        "tolerance | first gradient above tolerance (from the output) | worst check gradient "
        "| worst step-1 gradient, real batch | loss per step (source / target) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for p in result["pairs"]:
        losses = "; ".join(f"{s['loss_source']:.6f} / {s['loss_target']:.6f}"
                           for s in p.get("steps", ())) or "-"
        status = p["status"] + (f": {p['reason']}" if p.get("reason") else "")
        lines.append(
            f"| {p['model']} | {p['source']} -> {p['target']} | {status} | "
            f"{_fmt(p.get('output_max_abs'))} | {p.get('first_divergent') or 'none'} | "
            f"{p.get('first_divergent_gradient') or 'none'} | "
            f"{_worst(p.get('gradients', ()))} | {_worst(p.get('real_gradients', ()))} | "
            f"{losses} |"
        )
    for p in result["pairs"]:
        if not p.get("layers"):
            continue
        lines += ["", f"<details><summary>{p['model']}: {p['source']} -> {p['target']}, per "
                  "layer, per variable and per step</summary>", "",
                  "| layer | max abs diff | relative |", "| --- | --- | --- |"]
        lines += [f"| {lay['name']} | {lay['max_abs']:.2e} | {lay['rel']:.2e} |"
                  for lay in p["layers"]]
        real = {g["name"]: g["rel"] for g in p.get("real_gradients", ())}
        lines += ["", "| variable | gradient norm | check step, float64 (rel) | check step, "
                  "float32 (rel) | float32 error | real batch, float32 (rel) |",
                  "| --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {g['name']} | {g['norm']:.3g} | {_fmt(g.get('rel64'))} | {g['rel']:.1e} | "
                  f"{_fmt(g.get('err32'))} | {_fmt(real.get(g['name']))} |"
                  for g in p.get("gradients", ())]
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


def parity_verb(spec_path: Path, overrides: tuple[str, ...], models: Sequence[str] | None,
                backends: Sequence[str] | None, steps: int, where: Any) -> int:
    """`python -m harness parity`: prepare the data, compare, write parity.json, print the
    table. Exit 0 when every pair passes (or is not portable), 1 otherwise."""
    from harness.data import prepare_data
    from harness.results import results_lock, write_json_atomic
    from harness.spec import load_spec
    from harness.validate import spec_fields

    if steps < 1:
        raise UserError(f"--steps: must be at least 1; got {steps}")
    spec = load_spec(spec_path, list(overrides))
    results_dir = where.results_dir(spec)
    with results_lock(results_dir):
        with spec_fields(spec):
            data = prepare_data(spec.data, where.cache(), progress=True)
        if data is None:  # build=True always returns the data
            raise RuntimeError("prepare_data returned no data")
        log = results_dir / "logs" / "parity.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text("", encoding="utf-8")
        result = run_parity(spec, data, list(models) if models else None,
                            list(backends) if backends else None, steps, log)
        write_json_atomic(results_dir / "parity.json", result.to_json())
    print(render_parity(result.to_json()))
    print(f"parity: {results_dir / 'parity.json'} (logs: {log})")
    return 0 if result.passed else 1
