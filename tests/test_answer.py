"""The one answer function: every rule on hand-made tensors (the CLI, API, server and ONNX graph on a grown and
shrunk model are in test_deploy.py)."""
import torch

from ovr.learn.answer import AnswerTensors, answer
from ovr.config import AnswerOptions
from ovr.errors import OvrError

import pytest


def _tensors(thresholds):
    f64 = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    return AnswerTensors({"weight": torch.eye(3, dtype=torch.float64), "bias": torch.zeros(3, dtype=torch.float64)},
                         "standardize", f64([1.0] * 3), f64([0.0] * 3), f64(thresholds), torch.zeros(3, 3).double())


def test_the_answer_is_the_top_reported_confidence_or_unknown():
    """The issue's wrong answers: the answer is the top reported class (or unknown); runner-up the second; with
    thresholds, the answer's own head must pass its own threshold, whatever other heads do."""
    z = torch.tensor([[2.0, 3.0, -1.0], [0.5, -2.0, 4.0]], dtype=torch.float64)
    t = _tensors([0.5, 0.99, 0.5])
    r = answer(t, z)
    assert r.index.tolist() == [1, 2] and r.top_index[:, 1].tolist() == [0, 0]
    assert torch.equal(r.top_confidence[:, 0], r.confidences.max(1).values)
    # row 0: class 1 is top but misses its own threshold (0.95 < 0.99), though class 0 passes its own: unknown
    assert answer(t, z, (), AnswerOptions(thresholds=True)).index.tolist() == [-1, 2]
    assert answer(t, z, (), AnswerOptions(reject_below=0.96)).index.tolist() == [-1, 2]
    assert answer(t, z, (), AnswerOptions(multilabel=True)).labels.tolist() == [[True, False, False],
                                                                                [True, False, True]]


def test_a_gated_head_loses_to_the_class_its_gate_says_it_never_saw():
    t = _tensors([0.5, 0.5, 0.5])
    t.unseen[2, 0] = 1.0  # head 2 never saw class 0
    t.gate_weight, t.gate_bias = torch.eye(3, dtype=torch.float64) * 50, torch.zeros(3, dtype=torch.float64)
    r = answer(t, torch.tensor([[2.0, -2.0, 4.0]], dtype=torch.float64))  # raw argmax: head 2
    assert r.index.tolist() == [2]  # the gate says class 2 (4 x 50): head 2 keeps its confidence
    r = answer(t, torch.tensor([[4.0, -2.0, 3.9]], dtype=torch.float64).clone())
    assert r.index.tolist() == [0]
    r = answer(t, torch.tensor([[3.0, -2.0, 4.0]], dtype=torch.float64) * torch.tensor([[1.5, 1.0, 1.0]]).double())
    assert float(r.confidences[0, 2]) < 1e-6 and r.index.tolist() == [0]  # the gate: class 0 (4.5 > 4): head 2 out


def test_calibrated_answers_and_thresholds_live_in_the_same_space():
    t = _tensors([0.5, 0.6, 0.5])
    t.cal_a[:] = 0.5
    z = torch.tensor([[0.2, 0.3, -1.0]], dtype=torch.float64)
    r = answer(t, z, (), AnswerOptions(calibrated=True, thresholds=True))
    assert torch.allclose(r.confidences, torch.sigmoid(0.5 * z))
    assert torch.allclose(r.thresholds[1], torch.sigmoid(0.5 * torch.logit(torch.tensor(0.6, dtype=torch.float64))))
    assert r.index.tolist() == [-1]  # sigmoid(0.15) < the calibrated threshold sigmoid(0.5 logit(0.6))
    assert answer(t, z, (), AnswerOptions(calibrated=True)).index.tolist() == [1]


def test_tta_averages_logits_over_views():
    t = _tensors([0.5] * 3)
    X = torch.tensor([[1.0, 0.0, 0.0]], dtype=torch.float64)
    V = torch.tensor([[0.0, 3.0, 0.0]], dtype=torch.float64)
    assert torch.allclose(answer(t, X, [V]).logits, (X + V) / 2)


@pytest.mark.parametrize("bad", [dict(reject_below=float("nan")), dict(reject_below=2.0), dict(reject_below="0.5"),
                                 dict(top_k=0), dict(tta=-1), dict(tta="3"), dict(top_k=True)])
def test_options_are_checked_when_built(bad):
    with pytest.raises(OvrError):
        AnswerOptions(**bad)
