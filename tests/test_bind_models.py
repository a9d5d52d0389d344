"""Methods that need the models themselves (Method.bind_models / predictor / stages): OFD's
margins, SimKD's reused classifier and FT's paraphraser stage, reached through the Distiller
and recipes with no Python set-up."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import distill
from distill import functional as DF
from distill.data.loader import InMemoryLoader
from distill.methods import create_method
from distill.methods.boundaries import OFD
from distill.models import create
from distill.recipes import RecipeError, parse_recipe
from distill.train import fit_hint_stage
from distill.train.evaluate import evaluate


def _pair():
    torch.manual_seed(0)
    return create("cnn", widths=(4, 8, 8)), create("cnn", widths=(8, 16, 16))


def _loader(n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)
    return x, y, InMemoryLoader(x, y, 8, shuffle=False, return_index=True)


def test_ofd_takes_its_margins_from_the_teachers_batchnorms_when_prepared():
    student, teacher = _pair()
    for bn in (teacher.stage1.body[1], teacher.stage2.body[2], teacher.stage3.body[2]):
        bn.weight.data.uniform_(0.5, 2.0)
        bn.bias.data.normal_()
    x, y, loader = _loader()
    d = distill.Distiller(student, teacher, losses={"ce": 1.0, "ofd": 1e-3})
    d.prepare(next(iter(loader)))
    ofd = d.methods["ofd"]
    assert ofd.bn_paths == ["stage1.body.1", "stage2.body.2", "stage3.body.2"]
    for i, bn in enumerate((teacher.stage1.body[1], teacher.stage2.body[2], teacher.stage3.body[2])):
        # the margin of a Gaussian N(b, g^2) restricted to x < 0, from the BN's affine parameters
        torch.testing.assert_close(getattr(ofd, f"margin_{i}"), DF.ofd_margin(bn.weight.detach(), bn.bias.detach()))
    assert torch.isfinite(d((x[:8], y[:8])).parts["ofd"])
    # given margins are kept as they are
    fixed = [torch.full((c,), -0.5) for c in (8, 16, 16)]
    d2 = distill.Distiller(create("cnn", widths=(4, 8, 8)), teacher, losses={"ofd": OFD(margins=fixed)})
    d2.prepare(next(iter(loader)))
    assert torch.equal(d2.methods["ofd"].margin_0, fixed[0])


def test_ofd_without_a_single_teacher_model_is_a_clear_error():
    student, teacher = _pair()
    _, _, loader = _loader()
    with pytest.raises(ValueError, match="cannot provide feature taps"):  # an ensemble: refused at once
        distill.Distiller(student, [teacher, create("cnn", widths=(8, 16, 16))], losses={"ofd": 1e-3})
    ofd = OFD()  # used outside a Distiller, nobody bound the teacher: the error says what to do
    d = distill.Distiller(student, teacher, losses={"ofd": ofd})
    d.teacher_module = lambda: None  # a teacher source that wraps no single model
    with pytest.raises(RuntimeError, match="from_teacher"):
        d.prepare(next(iter(loader)))


def test_simkd_predicts_through_the_teachers_classifier_and_fit_evaluates_that():
    student, teacher = _pair()
    x, y, loader = _loader()
    d = distill.Distiller(student, teacher, losses={"simkd": {}})
    assert d.predictor() is student  # nothing bound before prepare
    d.prepare(next(iter(loader)))
    method = d.methods["simkd"]
    assert method.teacher_classifier is teacher.fc  # the teacher's last nn.Linear
    pred = d.predictor()
    assert pred is d.predictor()  # built once
    assert not any(p is q for p in method.parameters() for q in student.parameters())  # student not in its tree
    # independent computation: student stage3 -> projector -> global pool -> teacher fc
    pred.eval()
    store = {}
    h = student.stage3.register_forward_hook(lambda m, i, o: store.setdefault("s", o))
    with torch.no_grad():
        student.eval()(x)
        want = teacher.fc(F.adaptive_avg_pool2d(method.projector(store["s"]), 1).flatten(1))
        torch.testing.assert_close(pred(x), want)
    h.remove()
    acc = 100.0 * float((want.argmax(1) == y).float().mean())
    assert evaluate(d, loader)["student_acc"] == pytest.approx(acc)
    res = distill.fit(d, loader, loader, epochs=1, lr=0.01, schedule="constant", progress=False)
    assert res.last_acc == pytest.approx(evaluate(d, loader)["student_acc"])


def test_ft_paraphraser_stage_by_name_trains_only_the_paraphraser():
    student, teacher = _pair()
    _, _, loader = _loader()
    d = distill.Distiller(student, teacher, losses={"ce": 1.0, "ft": 200.0})
    ft = d.methods["ft"]
    with pytest.raises(KeyError, match="ft_paraphraser"):
        fit_hint_stage(d, loader, method="nope", epochs=1, progress=False)
    d.prepare(next(iter(loader)))
    para = [p.detach().clone() for p in ft.paraphraser.parameters()]
    trans = [p.detach().clone() for p in ft.translator.parameters()]
    stud = [p.detach().clone() for p in student.parameters()]
    fit_hint_stage(d, loader, method="ft_paraphraser", epochs=2, lr=0.01, schedule="constant", progress=False)
    assert any(not torch.equal(a, p) for a, p in zip(para, ft.paraphraser.parameters()))
    assert all(torch.equal(a, p) for a, p in zip(trans, ft.translator.parameters()))
    assert all(torch.equal(a, p) for a, p in zip(stud, student.parameters()))
    assert not any(p.requires_grad for p in ft.paraphraser.parameters())  # frozen again for the transfer
    out = d(next(iter(loader)))
    assert torch.isfinite(out.total)


def test_recipes_accept_a_stage_a_loss_offers_and_name_the_offer_otherwise():
    base = {"name": "r", "student": {"name": "cnn_digits_student"},
            "teacher": {"model": {"name": "cnn_digits_teacher", "checkpoint": "t.pt"}}, "train": {"epochs": 1}}
    ok = parse_recipe({**base, "losses": {"ce": 1.0, "ft": {}},
                       "hint_stage": {"method": "ft_paraphraser", "train": {"epochs": 1}}})
    assert ok.hint_stage is not None and ok.hint_stage.method == "ft_paraphraser"
    with pytest.raises(RecipeError, match="ft_paraphraser"):
        parse_recipe({**base, "losses": {"ce": 1.0, "kd": {}},
                      "hint_stage": {"method": "ft_paraphraser", "train": {"epochs": 1}}})


def test_methods_default_to_no_models_no_predictor_no_stages():
    m = create_method("kd")
    m.bind_models(torch.nn.Linear(2, 2), None, None)  # a no-op
    assert m.predictor(torch.nn.Linear(2, 2)) is None and m.stages == ()
    with pytest.raises(KeyError, match="no stage"):
        m.stage_method("x")


def test_jacobian_matching_is_given_the_distillers_models():
    from distill.methods.jacobian import JacobianMatching

    student, teacher = _pair()
    x, y, loader = _loader()
    d = distill.Distiller(student, teacher, losses={"ce": 1.0, "jacobian": {}})
    d.prepare(next(iter(loader)))
    method = d.methods["jacobian"]
    assert method.student_model is student and method.teacher_model is teacher
    assert torch.isfinite(d((x[:8], y[:8])).parts["jacobian"])
    other = create("cnn", widths=(4, 8, 8))
    given = JacobianMatching(student_model=other)  # a model given by the user is kept
    distill.Distiller(student, teacher, losses={"jacobian": given}).prepare(next(iter(loader)))
    assert given.student_model is other and given.teacher_model is teacher
