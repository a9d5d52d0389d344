"""Frame-level distillation on a real-pixel frame-labelling task (Lu et al. 2017; Tang et al. 2016).

Task (:mod:`distill.data.frames`): strips of real 8x8 digit images side by side, each pixel column a
frame (8 features), each frame labelled with its digit: the closest honest small stand-in for
speech frames, which are not available offline.

1. Lu et al., "Knowledge Distillation for Small-footprint Highway Networks" (arXiv 1608.00892): a
   large frame-wise DNN teacher (context window of ±4 frames) teaches a small highway DNN (HDNN)
   with per-frame soft targets (``frame_kd``, interpolated with ``frame_ce``), against the same HDNN
   trained on the hard labels only.
2. Tang et al., "Recurrent Neural Network Training with Dark Knowledge Transfer" (arXiv 1505.04630):
   the same DNN teacher's frame posteriors train a (bidirectional) highway-LSTM student on little
   data: dark-knowledge pre-training then hard-label fine-tuning (strategy ``dark_knowledge``),
   joint training, and the hard-label baseline, all with the same number of epochs.

Run::

    .venv/bin/python examples/language/frames.py            # a few CPU-minutes (1096 s wall on a shared, overloaded machine)
    .venv/bin/python examples/language/frames.py --quick    # a smoke run
"""

from __future__ import annotations

import argparse
import time

import torch

import distill
from distill.data.frames import frame_accuracy, make_frame_task
from distill.methods.frames import FrameCE, FrameKD
from distill.models import create
from distill.strategies.dark_knowledge import fit_dark_knowledge


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny data and few epochs")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    t0 = time.time()
    n_train, n_rnn, n_test, t_ep, ep = (40, 20, 20, 1, 1) if args.quick else (300, 60, 150, 12, 16)
    task = make_frame_task(num_train=n_train, num_test=n_test, digits_per_seq=3, seed=args.seed)
    train, test = task.loaders(32, seed=args.seed)
    fit_kw = dict(optimizer="adam", lr=1e-2, weight_decay=0.0, progress=False, seed=args.seed)
    f, k = task.in_features, task.num_classes

    torch.manual_seed(args.seed)
    teacher = create("frame_dnn", in_features=f, num_classes=k, hidden=(256, 256), context=4)
    distill.fit(distill.Distiller(teacher, None, {"frame_ce": FrameCE()}), train, None, epochs=t_ep,
                **{**fit_kw, "lr": 2e-3})
    teacher.eval()
    out = {"teacher": frame_accuracy(teacher, test)}

    # 1. Lu et al.: big DNN -> small HDNN, per-frame soft targets
    def hdnn():
        torch.manual_seed(args.seed + 1)
        return create("frame_hdnn", in_features=f, num_classes=k, width=16, depth=3, context=1)

    for name, losses in (("hdnn_ce", {"frame_ce": FrameCE()}),
                         ("hdnn_kd", {"frame_ce": FrameCE(weight=0.5), "frame_kd": FrameKD(T=1.0, weight=0.5)})):
        s = hdnn()
        distill.fit(distill.Distiller(s, teacher if "frame_kd" in losses else None, losses), train, None,
                    epochs=ep, **fit_kw)
        out[name] = frame_accuracy(s, test)

    # 2. Tang et al.: DNN teacher -> highway-LSTM student on little data
    small = make_frame_task(num_train=n_rnn, num_test=n_test, digits_per_seq=3, seed=args.seed)
    small_train, _ = small.loaders(16, seed=args.seed)

    def rnn():
        torch.manual_seed(args.seed + 2)
        return create("frame_highway_lstm", in_features=f, num_classes=k, hidden=16, layers=2, bidirectional=True)

    s = rnn()
    distill.fit(distill.Distiller(s, None, {"frame_ce": FrameCE()}), small_train, None, epochs=2 * ep, **fit_kw)
    out["rnn_ce"] = frame_accuracy(s, test)
    res = fit_dark_knowledge(rnn(), small_train, test, teacher=teacher, regime="pretrain", epochs=ep,
                             finetune_epochs=ep, T=2.0, **fit_kw)
    out["rnn_pretrain_soft"], out["rnn_pretrain_finetune"] = res.frame_accs
    res = fit_dark_knowledge(rnn(), small_train, test, teacher=teacher, regime="joint", epochs=2 * ep, T=2.0,
                             **fit_kw)
    out["rnn_joint"] = res.frame_accs[-1]

    print(f"frame labelling on digit strips: {n_train} train / {n_test} test sequences of "
          f"{task.train_inputs.shape[1]} frames x {f} features; test frame accuracy (%)")
    print(f"  teacher frame DNN (256x2, context ±4) trained {t_ep} epochs: {out['teacher']:.1f}")
    print(f"  Lu et al. 2017, small HDNN (16x3, context ±1), {ep} epochs:")
    print(f"    hard labels only                              {out['hdnn_ce']:.1f}")
    print(f"    0.5 frame_ce + 0.5 frame_kd (T=1)             {out['hdnn_kd']:.1f}")
    print(f"  Tang et al. 2016, highway BiLSTM (16), {n_rnn} train sequences, {2 * ep} epochs in all:")
    print(f"    hard labels only                              {out['rnn_ce']:.1f}")
    print(f"    soft targets (T=2) only, after {ep} epochs      {out['rnn_pretrain_soft']:.1f}")
    print(f"    soft pre-training + hard fine-tuning          {out['rnn_pretrain_finetune']:.1f}")
    print(f"    joint frame_ce + frame_kd (T=2)               {out['rnn_joint']:.1f}")
    print(f"({time.time() - t0:.0f} s)")
    return out


if __name__ == "__main__":
    torch.set_num_threads(min(2, torch.get_num_threads()))
    main()
