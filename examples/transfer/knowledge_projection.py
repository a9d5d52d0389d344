"""Knowledge projection (Zhang, Ning & He 2017, arXiv 1710.09505) with few labels: a teacher trained on
10,000 Fashion-MNIST images projects its stage features into a 4x thinner student that has only 500
labelled images. The projected teacher feature first feeds the student's upper layers, then is handed
over to the student's own lower layers; the projection loss's weight decays; the injection pair is
searched among the three stages.

    python examples/transfer/knowledge_projection.py --quick   # < 30 s
    python examples/transfer/knowledge_projection.py           # a few minutes on one CPU thread
"""

from __future__ import annotations

import argparse

import torch

import distill
from distill.data import get_dataset
from distill.data.loader import InMemoryLoader
from distill.models.small import CNN
from distill.strategies.knowledge_projection import fit_knowledge_projection


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small teacher set, few epochs")
    ap.add_argument("--labelled", type=int, default=500, help="labelled images the student sees")
    args = ap.parse_args()
    torch.set_num_threads(1)
    n_teacher, t_epochs, epochs = (2000, 1, 3) if args.quick else (10000, 4, 15)

    train, test = get_dataset("fashion_mnist", split="train"), get_dataset("fashion_mnist", split="test")
    val = InMemoryLoader(test.inputs[:1000], test.targets[:1000], 500, shuffle=False)
    teacher_data = InMemoryLoader(train.inputs[:n_teacher], train.targets[:n_teacher], 64, seed=0)
    # the student's few labelled images, disjoint from the teacher's
    labelled = InMemoryLoader(train.inputs[-args.labelled:], train.targets[-args.labelled:], 32, seed=0)

    torch.manual_seed(0)
    teacher = CNN(10, 1, widths=(32, 64, 128), stem_width=16, blocks=1, downsample=(True, True, True))
    t = distill.fit(distill.Distiller(teacher, None, {"ce": 1.0}), teacher_data, val, epochs=t_epochs, lr=0.05,
                    progress=False, eval_teacher=False)
    print(f"teacher ({n_teacher} images): {t.last_acc:.1f}%")

    def student() -> CNN:  # 4x thinner: stem 8, stages 8-16-32
        return CNN(10, 1, widths=(8, 16, 32), stem_width=8, blocks=1, downsample=(True, True, True))

    torch.manual_seed(0)
    alone = distill.fit(distill.Distiller(student(), None, {"ce": 1.0}), labelled, val, epochs=epochs, lr=0.05,
                        progress=False, eval_teacher=False)
    torch.manual_seed(0)
    r = fit_knowledge_projection(student, labelled, val, teacher=teacher, epochs=epochs,
                                 pairs=[("stage1", "stage1"), ("stage2", "stage2"), ("stage3", "stage3")],
                                 lr=0.05, progress=not args.quick, eval_teacher=False)
    print("search (joint loss per pair):", {k: round(v, 3) for k, v in r.search_losses.items()})
    print(f"chosen pair (student <- teacher): {r.pair[0]} <- {r.pair[1]}")
    print("alpha per epoch:", [h["projection_alpha"] for h in r.history])
    print(f"student alone (ce, {args.labelled} labels): {alone.last_acc:.1f}%  |  knowledge projection: "
          f"{r.last_acc:.1f}% (student alone at the end; injected net {r.injected_last_acc:.1f}%)")


if __name__ == "__main__":
    main()
