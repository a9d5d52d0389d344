"""Issue 14 (helper s11): pointdistiller's and lidar_distill's loss terms beside the task loss, at the start
and (given the runs folder) at the end of the 3D recipes' training. Nothing is trained here.

One batch of 16 `lidar_scenes` (seed 0) and the trained pillars_teacher of the 3D recipes (64 beams); per
setting, side by side: each weighted term, the norm of its gradient at all the student's parameters and at
its pillar feature net (pfn, pfn_norm: the only part pointdistiller's gradient reaches); for pointdistiller
also how many of the 64 graph centres carry the reweighting (1 / sum w^2), with and without the cap.

    OMP_NUM_THREADS=1 nice -n 15 python benchmarks/dense_papers_diag.py TEACHER.safetensors [RUNS]

TEACHER: a pillars_teacher trained on 64-beam scans (e.g. RUNS/dense_bev_sparse_kd3d/teacher/model.safetensors);
RUNS: the runs folder of docs/dense.md "3D recipes, measured" (reads seed0/checkpoints/last.pt of
dense_bev_pointdistiller and dense_bev_lidar_distill). About 15 s on one busy core.
"""
import copy
import sys

import torch
import torch.nn.functional as F

from distill import Distiller
from distill.data.pointscenes import make_point_scenes
from distill.methods.dense3d import BeamTeacher, with_teacher_points
from distill.models import create
from distill.train.checkpoint import load_model

torch.set_num_threads(1)
scenes64 = make_point_scenes(16, beams=64, seed=0, progress=False)
b64 = next(iter(scenes64.loader(16)))
b16 = with_teacher_points(next(iter(scenes64.with_beams(16).loader(16))), b64)
teacher, _ = load_model(sys.argv[1], create("pillars_teacher"))
teacher.eval()


def report(label, student, teacher_src, losses, batch, state=None):
    """Each loss term of one batch beside its gradient norms (all student parameters; the pillar net);
    ``state``: a run's ``distiller`` checkpoint state loaded first (the trained student and methods)."""
    torch.manual_seed(0)
    d = Distiller(student, teacher_src, losses)
    d.prepare(batch)
    if state is not None:
        d.student.load_state_dict(state["student"])
        d.methods.load_state_dict(state["methods"])
    d.train()
    out = d(batch)
    params = [p for p in d.student.parameters() if p.requires_grad]
    cells = []
    for name, m in d.methods.items():
        loss = m(out.student, out.teacher or {}, batch) * m.weight
        g = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        gn = torch.sqrt(sum(x.pow(2).sum() for x in g if x is not None))
        pfn = [p for n_, p in d.student.named_parameters() if n_.startswith("pfn")]
        gp = torch.autograd.grad(loss, pfn, retain_graph=True, allow_unused=True)
        gpn = torch.sqrt(sum(x.pow(2).sum() for x in gp if x is not None))
        cells.append(f"{name} {float(loss.detach()):7.3f} (|grad| {float(gn):7.3f}, pillar net {float(gpn):6.3f})")
    print(f"{label:44s} " + "   ".join(cells), flush=True)
    return d, out


# ---- PointDistiller (64 beams, half-width student from scratch, as bev_pointdistiller.yaml)
torch.manual_seed(0)
report("pointdistiller max_points=None (before)", create("pillars_student"), teacher,
       {"bev_loss": 1.0, "pointdistiller": {"max_points": None}}, b64)
torch.manual_seed(0)
d, out = report("pointdistiller max_points=32 (now default)", create("pillars_student"), teacher,
                {"bev_loss": 1.0, "pointdistiller": {}}, b64)
pd = d.methods["pointdistiller"]
counts = out.teacher["pillar_counts"].flatten(1)
top = counts.topk(pd.num_voxels, dim=1).values  # (B, S) the centres' point counts
for tau in (0.01, 1.0, 10.0):
    w = F.softmax(top / tau, dim=1)
    neff = 1.0 / w.pow(2).sum(1)
    print(f"  tau {tau:5g}: effective centres per scene (1/sum w^2) median {float(neff.median()):6.2f} of "
          f"{pd.num_voxels}; top-1 weight x S median {float((w.max(1).values * pd.num_voxels).median()):6.2f}")
print(f"  centre point counts per scene: max median {float(top[:, 0].median()):.0f}, 64th median "
      f"{float(top[:, -1].median()):.0f}; pillars with the max count per scene (median) "
      f"{float((counts == counts.max(1, keepdim=True).values).sum(1).float().median()):.0f}")

# ---- LiDAR Distillation (student 16 beams, teacher 64 beams)
torch.manual_seed(0)
report("lidar_distill, half-width student, scratch", create("pillars_student"), BeamTeacher(teacher),
       {"bev_loss": 1.0, "lidar_distill": {}}, b16)
report("lidar_distill, student = teacher's copy", copy.deepcopy(teacher).train().requires_grad_(True),
       BeamTeacher(teacher), {"bev_loss": 1.0, "lidar_distill": {}}, b16)
d, out = report("lidar_distill region=gt, scratch", create("pillars_student"), BeamTeacher(teacher),
                {"bev_loss": 1.0, "lidar_distill": {"region": "gt"}}, b16)
ld = d.methods["lidar_distill"]
boxes = ld.regions(out.teacher, b16)
print(f"  teacher boxes per scene (score >= 0.3): {[int(b.shape[0]) for b in boxes]}; "
      f"gt: {[int(b.shape[0]) for b in b16.boxes]}")
t = out.teacher["bev_features"]
print(f"  teacher bev_features: C = {t.shape[1]}, per-cell L2 norm mean {float(t.norm(dim=1).mean()):.3f}")

# ---- PointDistiller's importance as the authors' detectors see it: points per pillar capped at the
# voxeliser's max_num_points (32 in their KITTI PointPillars config)
for cap in (None, 32):
    c = counts if cap is None else counts.clamp(max=cap)
    top = c.topk(64, dim=1).values
    w = F.softmax(top / 0.01, dim=1)
    neff = 1.0 / w.pow(2).sum(1)
    print(f"  cap {str(cap):4s} tau 0.01: effective centres per scene median {float(neff.median()):5.1f} of 64 "
          f"(min {float(neff.min()):4.1f}, max {float(neff.max()):4.1f}); saturated pillars per scene median "
          f"{float((counts >= (cap or 10**9)).sum(1).float().median()):.0f}")

# ---- the same terms at the END of the recipes' training (their last.pt, seed 0), when a 2nd argument names
# the runs folder of docs/dense.md "3D recipes, measured"
if len(sys.argv) > 2:
    from distill.train.checkpoint import load_checkpoint

    def trained(label, run, teacher_src, losses, batch):
        state = load_checkpoint(f"{sys.argv[2]}/{run}/seed0/checkpoints/last.pt")["distiller"]
        torch.manual_seed(0)
        report(label, create("pillars_student"), teacher_src, losses, batch, state=state)

    trained("END pointdistiller (trained max_points=None)", "dense_bev_pointdistiller", teacher,
            {"bev_loss": 1.0, "pointdistiller": {"max_points": None}}, b64)
    trained("END lidar_distill (half-width, scratch)", "dense_bev_lidar_distill", BeamTeacher(teacher),
            {"bev_loss": 1.0, "lidar_distill": {}}, b16)
