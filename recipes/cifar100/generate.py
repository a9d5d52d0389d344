"""Write the CIFAR-100 recipes: one per (method, teacher→student pair), the protocol of
RepDistiller / mdistiller (Tian et al., ICLR 2020, arXiv 1910.10699): 240 epochs of SGD
(momentum 0.9, batch 64, weight decay 5e-4), lr 0.05 (0.01 for ShuffleNet/MobileNet
students) ×0.1 at epochs 150, 180 and 210, random crop (padding 4) and flip.

    python recipes/cifar100/generate.py          # rewrites recipes/cifar100/*.yaml

Each recipe is checked before it is written: its models are built and its Distiller prepared
on a random 32x32 batch, so every tap and adapter fits the pair. Weights translate the CIFAR
weights of RepDistiller/mdistiller to our losses where our reduction differs (the comment in
each file says how). CIFAR-100 itself is read from $DISTILL_CIFAR100 (the official
``cifar-100-python`` folder; nothing is downloaded).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent / "src"))

PAIRS = [("resnet32x4", "resnet8x4"), ("wrn_40_2", "wrn_16_2"), ("vgg13", "vgg8"), ("resnet32x4", "ShuffleV2")]
SMALL_LR_STUDENTS = {"ShuffleV1", "ShuffleV2", "MobileNetV2"}


def protocol(student: str) -> dict[str, Any]:
    return {"epochs": 240, "optimizer": "sgd", "lr": 0.01 if student in SMALL_LR_STUDENTS else 0.05,
            "momentum": 0.9, "weight_decay": 5.0e-4, "schedule": "multistep", "milestones": [150, 180, 210],
            "gamma": 0.1}


def _shapes(model: torch.nn.Module, paths: list[str], x: torch.Tensor) -> dict[str, tuple[int, ...]]:
    """Each tap path's output shape (without the batch axis) on the example ``x``."""
    from distill.taps import Taps

    taps = Taps(model, paths)
    with torch.no_grad(), taps.recording() as store:
        model.eval()(x)
    taps.remove()
    return {p: tuple(v.shape[1:]) for p, v in store.items()}


def hint_pair(teacher: torch.nn.Module, student: torch.nn.Module, x: torch.Tensor) -> tuple[str, str, int]:
    """The middle stage pair with equal spatial size (FitNets' guided/hint layers), and N = C·H·W of the hint."""

    def shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
        return _shapes(model, [p for p in model.tap_points if p.startswith("stage") and ".pre" not in p], x)

    ts, ss = shapes(teacher), shapes(student)
    for t_path in ("stage2", "stage3", "stage1"):
        for s_path in ("stage2", "stage1", "stage3"):
            if t_path in ts and s_path in ss and ts[t_path][1:] == ss[s_path][1:]:
                c, h, w = ts[t_path]
                return s_path, t_path, c * h * w
    raise ValueError(f"no stage pair with equal spatial size: {ts} vs {ss}")


def losses_for(method: str, teacher: torch.nn.Module, student: torch.nn.Module,
               x: torch.Tensor, s_name: str) -> tuple[dict[str, Any], dict[str, Any] | None, str]:
    """(losses, hint_stage, comment) for one method on one pair."""
    s_hint, t_hint, n = hint_pair(teacher, student, x)
    common = [f"stage{i}" for i in (1, 2, 3)]
    if method == "kd":
        return {"ce": 0.1, "kd": {"T": 4.0, "weight": 0.9}}, None, "RepDistiller: -r 0.1 -a 0.9, T = 4"
    if method == "dkd":
        return {"ce": 1.0, "dkd": {"alpha": 1.0, "beta": 8.0, "T": 4.0, "warmup_epochs": 20}}, None, \
            "mdistiller DKD CIFAR config: alpha 1, beta 8, T 4, 20 warm-up epochs"
    if method == "dist":
        return {"ce": 1.0, "dist": {"beta": 2.0, "gamma": 2.0, "T": 4.0}}, None, "DIST CIFAR: beta = gamma = 2, T = 4"
    if method == "fitnet":
        w = round(200.0 / n, 8)
        return ({"ce": 1.0, "fitnet": {"student_tap": s_hint, "teacher_tap": t_hint, "weight": w}}, None,
                f"RepDistiller: 100 x element-wise mean MSE = (200/N) x our 1/2||.||^2 per sample, "
                f"N = C*H*W = {n} of teacher {t_hint}")
    if method == "at":
        return {"ce": 1.0, "at": {"pairs": [[p, p] for p in common], "beta": 1000.0}}, None, \
            "the AT paper's beta = 1000 (divided per layer by N_j and the batch, as the paper says)"
    if method == "sp":
        return {"ce": 1.0, "sp": {"pairs": [["stage3", "stage3"]], "weight": 3000.0}}, None, \
            "RepDistiller: -b 3000 (the same loss as ours)"
    if method == "rkd":
        return {"ce": 1.0, "rkd": {}}, None, "the RKD paper's distance 25 / angle 50 on the pooled feature"
    if method == "pkt":
        return {"ce": 1.0, "pkt": {"weight": 468.75}}, None, \
            "RepDistiller: -b 30000 on a loss 1/B of ours: 30000 / 64 = 468.75"
    if method == "cc":
        return {"ce": 1.0, "cc": {}}, None, \
            "the CC paper's kernel form (RepDistiller's 0.02 weights a different, kernel-free formula)"
    if method == "nst":
        return {"ce": 1.0, "nst": {"weight": 50.0}}, None, "RepDistiller: -b 50 (the same MMD^2 as ours)"
    if method == "fsp":
        ch = {k: v[0] for k, v in _shapes(teacher, ["stem", "stage1", "stage2"], x).items()}
        lambdas = [float(f"{1.0 / (ch[a] * ch[b]):.6g}") for a, b in (("stem", "stage1"), ("stage1", "stage2"))]
        return {"ce": 1.0, "fsp": {"weight": 0.0, "lambdas": lambdas}}, \
            {"method": "fsp", "weight": 1.0, "train": {**protocol("x"), "epochs": 30, "milestones": [20]}}, \
            "the FSP paper's two stages: FSP alone first (lambda_i = 1/(C1*C2) of the teacher's pair: " \
            "RepDistiller's element mean), then the task loss with FSP off (weight 0)"
    if method == "ickd":
        c = _shapes(teacher, ["stage3"], x)["stage3"][0]
        return {"ce": 1.0, "ickd": {"student_tap": "stage3", "teacher_tap": "stage3", "weight": 2.5 * c}}, None, \
            f"the ICKD authors' -b 2.5 on a loss c = {c} times ours (their sum / (c*B), ours / (c^2*B)): 2.5*c"
    if method == "crd":
        return {"ce": 1.0, "crd": {"weight": 0.8}}, None, \
            "RepDistiller: -b 0.8; the data-set size and labels come from the training loader"
    if method == "vid":
        return {"ce": 1.0, "vid": {"reduction": "mean"}}, None, \
            "RepDistiller: -b 1 on the element-wise mean NLL (reduction: mean; the paper's sum is C*H*W larger)"
    if method == "cwd":
        return {"ce": 1.0, "cwd": {}}, None, "CWD on the last stage, tau = 4"
    if method == "mgd":
        return {"ce": 1.0, "mgd": {}}, None, "MGD's classification setting: alpha 7e-5, mask ratio 0.5"
    if method == "semckd":
        return {"ce": 1.0, "semckd": {}}, None, "SemCKD's beta = 400 over stages 1-3"
    if method == "ab":
        return ({"ce": 1.0, "ab": {"weight": 0.0, "layer_weights": [0.25, 0.5, 1.0]}},
                {"method": "ab", "weight": 0.003, "train": {**protocol("x"), "epochs": 30, "milestones": [30]}},
                "the AB protocol: 30 epochs of AB alone (the authors' layer weights 1/4, 1/2, 1 and 3/1000), "
                "then cross-entropy with AB off (weight 0)")
    if method == "ofd":
        return {"ce": 1.0, "ofd": {}}, None, \
            "the OFD paper's CIFAR alpha = 1e-3 on pre-ReLU stages 1-3; margins from the teacher's BatchNorms"
    if method == "ft":
        c, h, w = _shapes(teacher, ["stage3"], x)["stage3"]
        # RepDistiller pre-trains the paraphraser 30 epochs at lr 0.01 for ResNet/WRN students (else the
        # run's lr) with nn.MSELoss (mean); our paraphraser loss sums over C*H*W: weight 1/(C*H*W)
        lr = 0.01 if s_name.startswith(("resnet", "wrn")) else protocol(s_name)["lr"]
        stage = {"method": "ft_paraphraser", "weight": float(f"{1.0 / (c * h * w):.6g}"),
                 "train": {**protocol("x"), "lr": lr, "epochs": 30, "milestones": [30]}}
        return {"ce": 1.0, "ft": {}}, stage, \
            f"the FT authors' beta = 500 on the element-mean L1 of the normalised factors (our default); the " \
            f"paraphraser is pre-trained as RepDistiller does (30 epochs, MSE mean = our per-sample sum " \
            f"weighted 1/(C*H*W) = 1/{c * h * w})"
    if method == "simkd":
        return {"simkd": {}}, None, \
            "the SimKD paper: the projector's L2 loss alone (no CE, no KD); the student predicts with the " \
            "teacher's classifier, which fit evaluates"
    raise KeyError(method)


METHODS = ["kd", "dkd", "dist", "fitnet", "at", "sp", "rkd", "pkt", "cc", "nst", "fsp", "ickd", "crd", "vid",
           "cwd", "mgd", "semckd", "ab", "ofd", "ft", "simkd"]


def main() -> None:
    import distill
    from distill.adapters import ShapeMismatchError
    from distill.methods import create_method, method_info
    from distill.models import create
    from distill.recipes import parse_recipe

    x = torch.randn(4, 3, 32, 32)
    written = 0
    for t_name in sorted({t for t, _ in PAIRS}):
        recipe = {"name": f"cifar100_teacher_{t_name}", "kind": "train", "seeds": [0],
                  "data": {"name": "cifar100", "batch_size": 64, "augment": {"crop_padding": 4, "flip": True}},
                  "student": {"name": t_name}, "losses": {"ce": 1.0}, "train": protocol(t_name)}
        parse_recipe(recipe)
        (HERE / f"teacher_{t_name}.yaml").write_text(
            f"# Teacher {t_name} on CIFAR-100, the RepDistiller protocol.\n#\n"
            f"#   DISTILL_CIFAR100=/path/to/cifar-100-python distill train recipes/cifar100/teacher_{t_name}.yaml\n"
            + yaml.safe_dump(recipe, sort_keys=False))
        written += 1
    for t_name, s_name in PAIRS:
        teacher, student = create(t_name, num_classes=100), create(s_name, num_classes=100)
        for method in METHODS:
            try:
                method_info(method)
            except KeyError:
                continue
            losses, hint, comment = losses_for(method, teacher, student, x, s_name)
            ckpt = f"runs/cifar100_teacher_{t_name}/seed0/model.safetensors"
            recipe: dict[str, Any] = {
                "name": f"cifar100_{method}_{t_name}_{s_name}", "kind": "distill", "seeds": [0, 1, 2],
                "data": {"name": "cifar100", "batch_size": 64, "augment": {"crop_padding": 4, "flip": True}},
                "student": {"name": s_name}, "teacher": {"model": {"name": t_name, "checkpoint": ckpt}},
                "losses": losses, "train": protocol(s_name),
            }
            if hint is not None:
                recipe["hint_stage"] = hint
            parse_recipe(recipe)
            # dry run: taps resolve and adapters fit this pair
            methods = {}
            for name, spec in losses.items():
                kwargs = {"weight": spec} if isinstance(spec, float) else dict(spec)
                if "pairs" in kwargs:
                    kwargs["pairs"] = [tuple(p) for p in kwargs["pairs"]]
                methods[name] = create_method(name, **kwargs)
            d = distill.Distiller(create(s_name, num_classes=100), create(t_name, num_classes=100), losses=methods)
            d.bind_data(50000, torch.arange(50000) % 100)
            try:
                d.prepare((x, torch.zeros(4, dtype=torch.long), torch.arange(4)))
            except ShapeMismatchError as e:  # e.g. last stages of different resolution: no recipe
                print(f"skipped {method} {t_name}->{s_name}: {e}")
                continue
            header = (f"# {method} on CIFAR-100: {t_name} -> {s_name}, the RepDistiller protocol.\n"
                      f"# Weights: {comment}.\n"
                      f"# Teacher: train it first with recipes/cifar100/teacher_{t_name}.yaml.\n#\n"
                      f"#   DISTILL_CIFAR100=/path/to/cifar-100-python distill run "
                      f"recipes/cifar100/{method}_{t_name}_{s_name}.yaml\n")
            (HERE / f"{method}_{t_name}_{s_name}.yaml").write_text(header + yaml.safe_dump(recipe, sort_keys=False))
            written += 1
    print(f"wrote {written} recipes to {HERE}")


if __name__ == "__main__":
    main()
