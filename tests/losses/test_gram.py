"""GramLoss (dinotrain/losses/gram.py) against a plain-Python reference of its definition, for each option, in
float64 and float32, plus properties that fail when a part of it is wrong; and the token selection and the
teacher-grid resampling that feed it.

Measured once against the official `dinov3/loss/gram_loss.py` (facebookresearch/dinov3 at 6876159, imported from
a copy under /tmp, not kept: CI has none) on identical random inputs, (4, 49, 32) features, 5 draws per case,
every option (normalized true/false x none / remove_neg / remove_only_teacher_neg x img_level true/false) and
tokens_used masked / unmasked ((M, 16) tokens):
- float32: loss and student gradient bitwise equal (max difference 0) in every case;
- float64: the official module casts to float32 (`.float()`), ours computes in float64: loss difference at
  most 1.5e-7 relative (float32 rounding): 6.3e-9 absolute normalised (losses ~0.06), 9.5e-6 raw (losses ~67);
  with the official file's `.float()` casts removed, bitwise equal, loss and gradient;
- bfloat16 inputs (both cast to float32): bitwise equal;
- the teacher-grid resampling vs the official inline code in ssl_meta_arch.py (32x32 -> 16x16, bicubic and
  bilinear, antialias on/off, float32/float64): bitwise equal.
Tolerances here, against the float64 plain-Python reference: float64 1e-12 relative (measured at most 1.4e-15
over 20 draws of every case), float32 2e-5 relative (measured at most 2.2e-7; the margin covers other BLAS
summation orders).
"""

import itertools
import math

import pytest
import torch

from dinotrain.losses.gram import GramLoss, resize_patch_grid, select_tokens

OPTIONS = [dict(normalized=n, remove_neg=r, remove_only_teacher_neg=t)
           for n in (True, False) for r, t in ((False, False), (True, False), (False, True))]
OPTION_IDS = [("norm" if o["normalized"] else "raw") + ("-remove_neg" if o["remove_neg"] else "")
              + ("-only_teacher_neg" if o["remove_only_teacher_neg"] else "") for o in OPTIONS]


def reference_gram_loss(student, teacher, normalized, img_level, remove_neg, remove_only_teacher_neg):
    """The definition in plain Python floats: per group of tokens (one image, or the whole batch), every pair's
    similarity for student and teacher, negatives removed as the option says, squared differences averaged."""
    s, t = student.double().tolist(), teacher.double().tolist()
    if student.ndim == 2:
        groups = [(s, t)]
    elif img_level:
        groups = list(zip(s, t))
    else:
        groups = [([tok for img in s for tok in img], [tok for img in t for tok in img])]

    def unit(v):
        n = math.sqrt(sum(x * x for x in v))
        return [x / n for x in v] if normalized else v

    total, count = 0.0, 0
    for gs, gt in groups:
        gs, gt = [unit(v) for v in gs], [unit(v) for v in gt]
        for i in range(len(gs)):
            for j in range(len(gs)):
                ss = sum(a * b for a, b in zip(gs[i], gs[j]))
                tt = sum(a * b for a, b in zip(gt[i], gt[j]))
                if remove_neg or remove_only_teacher_neg:
                    tt = max(tt, 0.0)
                if remove_neg:
                    ss = max(ss, 0.0)
                total += (ss - tt) ** 2
                count += 1
    return total / count


def _features(*shape, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype), torch.randn(*shape, generator=g, dtype=dtype)


@pytest.mark.parametrize("img_level", [True, False], ids=["img_level", "batch_level"])
@pytest.mark.parametrize("opt", OPTIONS, ids=OPTION_IDS)
@pytest.mark.parametrize("dtype,rel", [(torch.float64, 1e-12), (torch.float32, 2e-5)], ids=["float64", "float32"])
def test_matches_the_reference(opt, img_level, dtype, rel):
    student, teacher = _features(3, 5, 4, dtype=dtype)
    loss = GramLoss(img_level=img_level, **opt)(student, teacher)
    assert loss.dtype == dtype
    expected = reference_gram_loss(student, teacher, img_level=img_level, **opt)
    assert loss.item() == pytest.approx(expected, rel=rel)


@pytest.mark.parametrize("opt", OPTIONS, ids=OPTION_IDS)
@pytest.mark.parametrize("dtype,rel", [(torch.float64, 1e-12), (torch.float32, 2e-5)], ids=["float64", "float32"])
def test_selected_tokens_over_the_batch_match_the_reference(opt, dtype, rel):
    student, teacher = _features(11, 4, dtype=dtype, seed=1)  # (M, D): tokens_used masked / unmasked
    loss = GramLoss(img_level=False, **opt)(student, teacher)
    assert loss.item() == pytest.approx(reference_gram_loss(student, teacher, img_level=False, **opt), rel=rel)


@pytest.mark.parametrize("img_level", [True, False], ids=["img_level", "batch_level"])
@pytest.mark.parametrize("opt", OPTIONS, ids=OPTION_IDS)
def test_gradient_matches_finite_differences(opt, img_level):
    student, teacher = _features(2, 4, 3, seed=2)
    loss = GramLoss(img_level=img_level, **opt)
    assert torch.autograd.gradcheck(lambda s: loss(s, teacher), (student.requires_grad_(),))


@pytest.mark.parametrize("opt", [o for o in OPTIONS if not o["remove_only_teacher_neg"]],
                         ids=[i for i in OPTION_IDS if "only_teacher" not in i])
def test_zero_when_student_equals_teacher(opt):
    student, _ = _features(3, 6, 5, seed=3)
    for img_level in (True, False):
        x = student.clone().requires_grad_()
        loss = GramLoss(img_level=img_level, **opt)(x, student)
        loss.backward()
        assert loss.item() == 0.0 and x.grad.abs().max().item() == 0.0
    assert GramLoss(**opt)(student, student + 0.1).item() > 0  # ... and not zero otherwise


@pytest.mark.parametrize("normalized", [True, False])
def test_only_teacher_neg_pulls_a_student_equal_to_its_teacher_up_to_zero_similarity(normalized):
    """With remove_only_teacher_neg a student equal to the teacher still pays for its negative similarities
    (the teacher's are 0): the loss is the mean squared negative part of the student's Gram matrix."""
    student, _ = _features(3, 6, 5, seed=3)
    gram = torch.nn.functional.normalize(student, dim=-1) if normalized else student
    gram = gram @ gram.transpose(1, 2)
    loss = GramLoss(normalized=normalized, remove_only_teacher_neg=True)(student, student)
    assert loss.item() == pytest.approx(gram.clamp(max=0).square().mean().item(), rel=1e-12)
    positive = student.abs()  # no negative similarity: zero
    assert GramLoss(normalized=normalized, remove_only_teacher_neg=True)(positive, positive).item() == 0.0


@pytest.mark.parametrize("opt", OPTIONS, ids=OPTION_IDS)
def test_invariant_to_rotations_and_to_a_joint_permutation_of_patches(opt):
    """Only similarities count: any orthogonal map of the feature space (a different one for student and
    teacher) and the same reordering of patches on both sides leave the loss unchanged."""
    student, teacher = _features(2, 7, 5, seed=4)
    q1, _ = torch.linalg.qr(torch.randn(5, 5, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(5, 5, dtype=torch.float64))
    perm = torch.randperm(7)
    for img_level in (True, False):
        loss = GramLoss(img_level=img_level, **opt)
        base = loss(student, teacher).item()
        assert loss(student @ q1, teacher @ q2).item() == pytest.approx(base, rel=1e-12)
        assert loss(student[:, perm], teacher[:, perm]).item() == pytest.approx(base, rel=1e-12)
    # across images only the batch-level loss mixes them: swapping the images of the student alone changes it
    batch, image = GramLoss(img_level=False, **opt), GramLoss(img_level=True, **opt)
    assert image(student.flip(0), teacher.flip(0)).item() == pytest.approx(image(student, teacher).item(), rel=1e-12)
    assert batch(student.flip(0), teacher).item() != pytest.approx(batch(student, teacher).item(), rel=1e-6)


def test_normalised_loss_ignores_feature_norms_and_the_raw_one_does_not():
    student, teacher = _features(2, 6, 4, seed=5)
    scale = torch.rand(2, 6, 1, dtype=torch.float64) * 3 + 0.1
    assert GramLoss(normalized=True)(student * scale, teacher / scale).item() == pytest.approx(
        GramLoss(normalized=True)(student, teacher).item(), rel=1e-12)
    assert GramLoss(normalized=False)(student * scale, teacher).item() != pytest.approx(
        GramLoss(normalized=False)(student, teacher).item(), rel=1e-3)


def test_image_and_batch_level_agree_on_one_image_only():
    student, teacher = _features(1, 8, 4, seed=6)
    assert GramLoss(img_level=True)(student, teacher).item() == pytest.approx(
        GramLoss(img_level=False)(student, teacher).item(), rel=1e-12)
    student, teacher = _features(2, 8, 4, seed=6)
    assert GramLoss(img_level=True)(student, teacher).item() != pytest.approx(
        GramLoss(img_level=False)(student, teacher).item(), rel=1e-3)


# two patches of one image in 2-D, so that each similarity is known: (1,0)·(-1,0) = -1, (1,0)·(0,1) = 0,
# (1,0)·(-0.6,0.8) = -0.6; the loss averages the 4 entries of the 2x2 Gram matrices (diagonal: 1 vs 1)
ANTIPODAL = [[1.0, 0.0], [-1.0, 0.0]]
ORTHOGONAL = [[1.0, 0.0], [0.0, 1.0]]
OBTUSE = [[1.0, 0.0], [-0.6, 0.8]]


@pytest.mark.parametrize("student,teacher,plain,remove_neg,only_teacher", [
    (ANTIPODAL, ORTHOGONAL, 0.5, 0.0, 0.5),     # student -1, teacher 0: only remove_neg zeroes the student
    (ORTHOGONAL, ANTIPODAL, 0.5, 0.0, 0.0),     # teacher -1, student 0: both options zero the teacher
    (ANTIPODAL, OBTUSE, 0.08, 0.0, 0.5),        # both negative: remove_neg zeroes both, only_teacher the teacher
])
def test_negative_removal_zeroes_what_it_says(student, teacher, plain, remove_neg, only_teacher):
    s, t = torch.tensor([student], dtype=torch.float64), torch.tensor([teacher], dtype=torch.float64)
    assert GramLoss()(s, t).item() == pytest.approx(plain, abs=1e-12)
    assert GramLoss(remove_neg=True)(s, t).item() == pytest.approx(remove_neg, abs=1e-12)
    assert GramLoss(remove_only_teacher_neg=True)(s, t).item() == pytest.approx(only_teacher, abs=1e-12)


def test_remove_neg_stops_the_gradient_of_negative_student_pairs():
    """A student pair that is negative while the teacher's is too gets no push back towards the teacher."""
    s = torch.tensor([[[1.0, 0.0], [-0.8, 0.6]]], dtype=torch.float64, requires_grad=True)  # similarity -0.8
    GramLoss(remove_neg=True)(s, torch.tensor([OBTUSE], dtype=torch.float64)).backward()
    assert s.grad.abs().max().item() == 0.0
    s.grad = None
    GramLoss(remove_only_teacher_neg=True)(s, torch.tensor([OBTUSE], dtype=torch.float64)).backward()
    assert s.grad.abs().max().item() > 0.1


def test_gradient_reaches_only_the_student():
    student, teacher = _features(2, 5, 4, seed=7)
    student.requires_grad_(), teacher.requires_grad_()
    GramLoss()(student, teacher).backward()
    assert student.grad is not None and student.grad.abs().max() > 0
    assert teacher.grad is None


def test_half_precision_inputs_are_computed_in_float32_also_under_autocast():
    student, teacher = _features(2, 6, 8, dtype=torch.float32, seed=8)
    expected_half = GramLoss()(student.bfloat16().float(), teacher.bfloat16().float())
    expected = GramLoss()(student, teacher)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # would run the Gram matmuls in bfloat16
        got_half = GramLoss()(student.bfloat16(), teacher.bfloat16())
        got = GramLoss()(student, teacher)
    assert got_half.dtype == got.dtype == torch.float32
    assert torch.equal(got_half, expected_half) and torch.equal(got, expected)


def test_bad_inputs_are_one_line_errors():
    student, teacher = _features(2, 5, 4, seed=9)
    cases = [
        (lambda: GramLoss(remove_neg=True, remove_only_teacher_neg=True), "exclusive"),
        (lambda: GramLoss()(student, teacher[:, :4]), r"differ in shape \(resample"),
        (lambda: GramLoss(img_level=True)(student[0], teacher[0]), r"image level expects \(B, N, D\)"),
        (lambda: GramLoss()(student.long(), teacher), "floating-point student"),
    ]
    for make, needle in cases:
        with pytest.raises(ValueError, match=needle) as err:
            make()
        assert "\n" not in str(err.value)


def test_select_tokens_picks_the_masked_or_the_unmasked_patches():
    student, teacher = _features(3, 4, 2, seed=10)
    masks = torch.tensor([[1, 0, 0, 1], [0, 0, 0, 0], [1, 1, 1, 0]], dtype=torch.bool)
    pairs = list(itertools.product(range(3), range(4)))
    for which, want in (("masked", True), ("unmasked", False)):
        s, t = select_tokens(student, teacher, masks, which)
        expected = [(b, n) for b, n in pairs if bool(masks[b, n]) == want]
        assert torch.equal(s, torch.stack([student[b, n] for b, n in expected]))
        assert torch.equal(t, torch.stack([teacher[b, n] for b, n in expected]))
    assert select_tokens(student, teacher, None, "all") == (student, teacher)
    with pytest.raises(ValueError, match=r"needs boolean masks of shape \(3, 4\)"):
        select_tokens(student, teacher, masks.long(), "masked")
    with pytest.raises(ValueError, match="tokens_used must be one of all, masked, unmasked"):
        select_tokens(student, teacher, masks, "some")


def test_resize_patch_grid_keeps_the_grid_layout():
    # (B=1, 4x6 grid, D=2): feature 0 is the row, feature 1 the column; bilinear 2x down with align_corners=False
    # samples between each 2x2 block's centres, so each new patch is its block's mean (rows 0.5, 2.5; cols 0.5 ...)
    rows, cols = torch.meshgrid(torch.arange(4.0), torch.arange(6.0), indexing="ij")
    grid = torch.stack([rows, cols], -1).reshape(1, 24, 2).double()
    out = resize_patch_grid(grid, (4, 6), (2, 3), method="bilinear")
    expected = torch.tensor([[[r, c] for r in (0.5, 2.5) for c in (0.5, 2.5, 4.5)]], dtype=torch.float64)
    assert torch.allclose(out, expected, atol=1e-12)
    # bicubic keeps a feature that varies along columns only constant along rows, and the same size is identity
    bicubic = resize_patch_grid(grid, (4, 6), (2, 3)).reshape(2, 3, 2)
    assert torch.allclose(bicubic[0, :, 1], bicubic[1, :, 1], atol=1e-12)
    assert resize_patch_grid(grid, (4, 6), (4, 6)) is grid
    with pytest.raises(ValueError, match=r"not \(B, 5\*5, D\) tokens of a 5x5 grid"):
        resize_patch_grid(grid, (5, 5), (2, 2))
    with pytest.raises(ValueError, match="resize method must be one of bilinear, bicubic"):
        resize_patch_grid(grid, (4, 6), (2, 3), method="nearest")
