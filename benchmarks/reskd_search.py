"""ResKD's searched chain vs the hand-given ResKD chain vs KD alone vs the teacher, on digits.

Per seed, one run each (the teacher is trained once, seed 0):

* KD alone: ResKD's stage 0, the student (``cnn`` widths 4/4/8, 648 parameters) by KD
  (T = 4, λ = 0.9); the hand-given and the searched chains start from the same stage 0 (same seed
  and recipe, so the same model: checked and printed);
* ``reskd``: the student + one hand-given res-student, ``cnn`` widths 2/4/4 (344 parameters);
* ``reskd_search``: res-students searched in the ``cnn`` family 2/2/2, 2/2/4, 2/4/4, 4/4/4, 4/4/8
  (cheapest first, kept when the held-out gain >= ``--min-gain`` points, at most ``--max-stages``,
  each no costlier than the part before it: this library's rule), scored on a held-out split of
  the training data (347 images), never on the test images.

Digits: of the 1347 training images (shuffled once) 1000 train and 347 are held out; the 450 test
images test. Adam 0.005, cosine, batch 50, ``--epochs`` per stage. Cost: parameters and
multiply-accumulates per image (Conv/Linear, :func:`~distill.strategies.reskd_search.count_macs`)
relative to the teacher's. "adaptive": the
sample-adaptive inference (this library's rule: a sample stops once its running top probability
reaches 0.9), its accuracy and mean MACs per image::

    python benchmarks/reskd_search.py                 # 3 seeds, 20 epochs per stage
    python benchmarks/reskd_search.py --quick         # 1 seed, 3 epochs
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import distill
from distill.data.loader import InMemoryLoader
from distill.strategies.chain import reskd
from distill.strategies.reskd_search import SearchStep, count_macs, reskd_search

STUDENT = (4, 4, 8)
FAMILY_WIDTHS = [(2, 2, 2), (2, 2, 4), (2, 4, 4), (4, 4, 4), (4, 4, 8)]
HAND = (2, 4, 4)


def cnn(w: tuple[int, int, int]) -> dict:
    return {"name": "cnn", "widths": list(w), "stem_width": max(2, w[0] // 2), "num_classes": 10}


def trial_text(s: SearchStep) -> str:
    """``stage/widths gain`` with ``*`` when kept."""
    return f"{s.stage}/{'x'.join(map(str, FAMILY_WIDTHS[s.candidate]))} {s.gain:+.2f}{'*' if s.accepted else ''}"


def ms(values: list[float]) -> str:
    if len(set(values)) == 1 and float(values[0]).is_integer():
        return f"{int(values[0]):,}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}" if len(values) > 1 else f"{values[0]:.2f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--min-gain", type=float, default=0.5)
    p.add_argument("--max-stages", type=int, default=3)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    if args.quick:
        args.epochs, args.seeds = 3, 1
    torch.set_num_threads(1)
    start = time.time()
    data, test_data = distill.data.get_dataset("digits"), distill.data.get_dataset("digits", split="test")
    perm = torch.randperm(len(data.targets), generator=torch.Generator().manual_seed(0))
    x, y = data.inputs[perm], data.targets[perm]  # the 1347 training images, shuffled once
    held_out = InMemoryLoader(x[1000:], y[1000:], 347, shuffle=False)
    test = InMemoryLoader(test_data.inputs, test_data.targets, 450, shuffle=False)
    fit = {"optimizer": "adam", "lr": 0.005, "schedule": "cosine", "progress": False}
    example = x[:1]

    torch.manual_seed(0)
    teacher = distill.models.create("cnn_digits_teacher")
    t = distill.fit(distill.Distiller(teacher, None, {"ce": 1.0}), InMemoryLoader(x[:1000], y[:1000], 50, seed=0),
                    test, epochs=args.epochs, **fit)
    t_params = sum(q.numel() for q in teacher.parameters())
    t_macs = count_macs(teacher, example)

    def cost(model: torch.nn.Module) -> tuple[int, int]:
        return sum(q.numel() for q in model.parameters()), count_macs(model, example)

    rows: dict[str, dict[str, list[float]]] = {k: {} for k in ("KD alone (stage 0)", "reskd (hand-given)",
                                                                "reskd_search")}

    def add(name: str, **vals: float) -> None:
        for k, v in vals.items():
            rows[name].setdefault(k, []).append(v)

    detail = []
    for seed in range(args.seeds):
        train = InMemoryLoader(x[:1000], y[:1000], 50, seed=seed)
        torch.manual_seed(seed)
        hand = reskd(cnn(STUDENT), train, test, teacher=teacher, res_students=[cnn(HAND)],
                     epochs=args.epochs, seed=seed, **fit)
        torch.manual_seed(seed)
        print(f"seed {seed} ...", flush=True)
        found = reskd_search(cnn(STUDENT), train, test, teacher=teacher,
                             family=[cnn(w) for w in FAMILY_WIDTHS], held_out=held_out, epochs=args.epochs,
                             min_gain=args.min_gain, max_stages=args.max_stages, cost="macs", seed=seed, **fit)
        s_params, s_macs = cost(hand.models[-1].parts[0])
        add("KD alone (stage 0)", acc=hand.stages[0].last_acc, params=s_params, macs=100 * s_macs / t_macs)
        h_params, h_macs = cost(hand.models[-1])
        r_macs = s_macs + hand.part_usage[0] * count_macs(hand.models[-1].parts[1], example)
        add("reskd (hand-given)", acc=hand.last_acc, params=h_params, macs=100 * h_macs / t_macs,
            adaptive_acc=hand.adaptive_acc, adaptive_macs=100 * r_macs / t_macs)
        f_params, f_macs = cost(found.models[-1])
        add("reskd_search", acc=found.last_acc, params=f_params, macs=100 * f_macs / t_macs,
            adaptive_acc=found.adaptive_acc, adaptive_macs=100 * found.adaptive_cost / t_macs,
            fits=1 + len(found.steps))
        stages = "; ".join(f"stage {k}: test {a:.2f}% held-out {h:.2f}% MACs {100 * c / t_macs:.2f}%"
                           for k, (a, h, c) in enumerate(zip(found.stage_val_acc, found.stage_held_out_acc,
                                                             found.stage_cost, strict=True)))
        detail.append(f"seed {seed}: stage 0 same in both chains: {hand.stages[0].last_acc == found.stages[0].last_acc}"
                      f"; hand-given chain test {hand.stages[0].last_acc:.2f}% -> {hand.last_acc:.2f}%"
                      f"; searched {['x'.join(map(str, FAMILY_WIDTHS[i])) for i in found.chosen]} "
                      f"(stop: {found.stop_reason}; trials: "
                      f"{', '.join(trial_text(s) for s in found.steps)})"
                      f"\n  {stages}")

    print(f"digits, {args.seeds} seed(s), {args.epochs} epochs per stage; teacher test {t.last_acc:.2f}%, "
          f"{t_params:,} params, {t_macs:,} MACs/image")
    print("| model | test top-1 (%) | params | params / teacher | MACs / teacher | adaptive top-1 (%) "
          "| adaptive MACs / teacher | fits |")
    print("| :--- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    print(f"| teacher | {t.last_acc:.2f} | {t_params:,} | 100% | 100% | | | 1 |")
    for name, r in rows.items():
        adaptive = (f"{ms(r['adaptive_acc'])} | {ms(r['adaptive_macs'])}%" if "adaptive_acc" in r else " | ")
        fits = ms(r["fits"]) if "fits" in r else ("2" if name.startswith("reskd (") else "1")
        print(f"| {name} | {ms(r['acc'])} | {ms(r['params'])} | {100 * statistics.mean(r['params']) / t_params:.2f}% "
              f"| {ms(r['macs'])}% | {adaptive} | {fits} |")
    print("\n".join(detail))
    print(f"trial legend: stage/widths held-out gain (points), * kept. wall {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
