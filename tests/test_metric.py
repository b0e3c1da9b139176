"""Prototypical and Relation Networks: scores against hand computations, label checks, and
a few training steps on the digits."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastmeta
from fastmeta.data import Digits, TaskSampler
from fastmeta.metric import (accuracy, class_means, relation_encoder, relation_feature_size,
                             relation_module)


def episode(tasks=3, ways=4, shots=2, queries=3, features=5, dtype=torch.float64):
    """Random inputs, labels class-major (0,0,1,1,...), each task's labels permuted."""
    sx = torch.randn(tasks, ways * shots, features, dtype=dtype)
    qx = torch.randn(tasks, ways * queries, features, dtype=dtype)
    sy = torch.stack([torch.randperm(ways).repeat_interleave(shots) for _ in range(tasks)])
    qy = torch.stack([torch.randperm(ways).repeat_interleave(queries) for _ in range(tasks)])
    return sx, sy, qx, qy


def linear_encoder(features=5, out=6, dtype=torch.float64):
    return nn.Linear(features, out).to(dtype)


def test_protonet_scores_are_negative_squared_distances_to_class_means():
    sx, sy, qx, qy = episode()
    encoder = linear_encoder()
    proto = fastmeta.ProtoNet(encoder)
    scores = proto.predict(sx, sy, qx)
    assert scores.shape == (3, 12, 4)
    with torch.no_grad():
        for t in range(3):
            fs, fq = encoder(sx[t]), encoder(qx[t])
            for n in range(4):
                mean = fs[sy[t] == n].mean(0)
                expected = -((fq - mean) ** 2).sum(1)
                assert torch.allclose(scores[t, :, n], expected, atol=1e-10)


def test_protonet_loss_is_mean_of_per_task_cross_entropy():
    sx, sy, qx, qy = episode()
    proto = fastmeta.ProtoNet(linear_encoder())
    loss = proto(sx, sy, qx, qy)
    scores = proto.predict(sx, sy, qx)
    expected = torch.stack([F.cross_entropy(scores[t], qy[t]) for t in range(3)]).mean()
    assert torch.allclose(loss, expected)
    loss.backward()
    assert all(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in proto.parameters())


def test_protonet_cosine():
    sx, sy, qx, qy = episode()
    encoder = linear_encoder()
    proto = fastmeta.ProtoNet(encoder, distance="cosine")
    scores = proto.predict(sx, sy, qx)
    with torch.no_grad():
        for t in range(3):
            fs, fq = encoder(sx[t]), encoder(qx[t])
            for n in range(4):
                mean = fs[sy[t] == n].mean(0)
                expected = 10.0 * F.cosine_similarity(fq, mean[None], dim=1)
                assert torch.allclose(scores[t, :, n], expected, atol=1e-10)
    learned = fastmeta.ProtoNet(linear_encoder(), distance="cosine", scale=3.0, learn_scale=True)
    assert any(p is learned.scale for p in learned.parameters())
    learned(sx, sy, qx, qy).backward()
    assert learned.scale.grad is not None


def test_protonet_flattens_conv_features_and_runs_all_tasks_at_once():
    calls = []
    conv = nn.Sequential(*list(fastmeta.models.conv4(1, 5, 8, 16))[:-2])   # no Flatten/Linear

    class Recorder(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = conv

        def forward(self, x):
            calls.append(tuple(x.shape))
            return self.body(x)

    proto = fastmeta.ProtoNet(Recorder())
    sx, qx = torch.rand(4, 5, 1, 16, 16), torch.rand(4, 10, 1, 16, 16)
    sy = torch.arange(5).repeat(4, 1)
    qy = torch.arange(5).repeat_interleave(2).repeat(4, 1)
    assert proto.predict(sx, sy, qx).shape == (4, 10, 5)
    assert calls == [(60, 1, 16, 16)]
    assert torch.isfinite(proto(sx, sy, qx, qy))


def test_class_means_by_hand():
    features = torch.tensor([[[1.0, 0.0], [3.0, 2.0], [5.0, 5.0]]])
    labels = torch.tensor([[1, 1, 0]])
    assert torch.equal(class_means(features, labels, 2), torch.tensor([[[5.0, 5.0], [2.0, 1.0]]]))


@pytest.mark.parametrize("kind", ["proto", "relation"])
def test_metric_learners_validate_labels(kind):
    if kind == "proto":
        learner, (sx, sy, qx, qy) = fastmeta.ProtoNet(linear_encoder()), episode()
    else:
        learner, (sx, sy, qx, qy) = fastmeta.RelationNet(conv_encoder(), relation_module(2, 3, 4).double()), image_episode()
    holey = sy.clone()
    holey[1][holey[1] == 2] = 0                                       # task 1 lacks label 2
    with pytest.raises(ValueError, match="task 1 has no label 2"):
        learner.predict(sx, holey, qx)
    bad_query = qy.clone()
    bad_query[0, 0] = 4
    with pytest.raises(ValueError, match="query_y holds labels in"):
        learner(sx, sy, qx, bad_query)
    with pytest.raises(TypeError, match="support_y must hold int64"):
        learner(sx, sy.float(), qx, qy)
    with pytest.raises(ValueError, match="support_y holds labels"):
        learner(sx, sy - 1, qx, qy)
    with pytest.raises(ValueError, match="query_x has 2 tasks"):
        learner(sx, sy, qx[:2], qy[:2])
    with pytest.raises(TypeError, match="query_x is torch.float32"):
        learner(sx, sy, qx.float(), qy)
    assert torch.isfinite(learner(sx, sy, qx, qy))


def test_protonet_constructor_errors():
    with pytest.raises(ValueError, match="distance must be one of"):
        fastmeta.ProtoNet(linear_encoder(), distance="manhattan")
    with pytest.raises(TypeError, match="encoder must be an nn.Module"):
        fastmeta.ProtoNet(lambda x: x)
    with pytest.raises(ValueError, match="scale must be a finite positive number"):
        fastmeta.ProtoNet(linear_encoder(), scale=0)
    with pytest.raises(ValueError, match="scale must be a finite positive number"):
        fastmeta.ProtoNet(linear_encoder(), scale=float("inf"))
    with pytest.raises(ValueError, match="overflows the encoder's torch.float32"):
        fastmeta.ProtoNet(linear_encoder(dtype=torch.float32), "cosine", scale=1e300)
    with pytest.raises(ValueError, match="has no parameters"):
        fastmeta.ProtoNet(nn.Flatten())


def test_accuracy_helper():
    scores = torch.tensor([[[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]], [[0.0, 1.0], [1.0, 0.0], [1.0, 0.0]]])
    targets = torch.tensor([[0, 1, 1], [1, 0, 0]])
    assert torch.allclose(accuracy(scores, targets, per_task=True), torch.tensor([2 / 3, 1.0]))
    assert math.isclose(float(accuracy(scores, targets)), 5 / 6, rel_tol=1e-6)
    with pytest.raises(ValueError, match="scores must be"):
        accuracy(scores[0], targets)


def train(learner, sampler, steps, lr):
    optimizer = torch.optim.Adam(learner.parameters(), lr=lr)
    for _ in range(steps):
        batch = sampler.sample()
        optimizer.zero_grad()
        learner(*batch).backward()
        optimizer.step()


def evaluate(learner, batch):
    with torch.no_grad():
        loss = float(learner(*batch))
        acc = float(accuracy(learner.predict(*batch[:3]), batch.query_y))
    return loss, acc


@pytest.fixture(scope="module")
def digits():
    return Digits("train"), Digits("test")


def test_protonet_learns_digits(digits):
    train_set, test_set = digits
    encoder = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16, track_running_stats=False),
                            nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(16, 16, 3, padding=1),
                            nn.BatchNorm2d(16, track_running_stats=False), nn.ReLU(), nn.MaxPool2d(2),
                            nn.Flatten())
    proto = fastmeta.ProtoNet(encoder)
    held_out = TaskSampler(train_set, 5, 1, 10, 16, seed=99).sample()
    before, _ = evaluate(proto, held_out)
    train(proto, TaskSampler(train_set, 10, 1, 5, 4, seed=0), 20, 3e-3)
    after, acc = evaluate(proto, held_out)
    assert after < 0.8 * before, (before, after)
    _, test_acc = evaluate(proto, TaskSampler(test_set, 5, 1, 10, 16, seed=5).sample())
    assert test_acc > 0.35                                             # chance is 0.2


def conv_encoder(channels=2):
    return nn.Sequential(nn.Conv2d(1, channels, 1)).to(torch.float64)


def image_episode(tasks=3, ways=4, shots=2, queries=3):
    sx = torch.rand(tasks, ways * shots, 1, 3, 3, dtype=torch.float64)
    qx = torch.rand(tasks, ways * queries, 1, 3, 3, dtype=torch.float64)
    sy = torch.stack([torch.randperm(ways).repeat_interleave(shots) for _ in range(tasks)])
    qy = torch.stack([torch.randperm(ways).repeat_interleave(queries) for _ in range(tasks)])
    return sx, sy, qx, qy


def test_relationnet_pairs_scores_and_loss_by_hand():
    encoder = conv_encoder()
    seen = []

    class Relation(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(4 * 9, 1).to(torch.float64)

        def forward(self, pairs):
            seen.append(pairs)
            return torch.sigmoid(self.linear(pairs.flatten(1)))

    net = fastmeta.RelationNet(encoder, Relation())
    sx, sy, qx, qy = image_episode()
    scores = net.predict(sx, sy, qx)
    assert scores.shape == (3, 12, 4) and bool(((scores > 0) & (scores < 1)).all())
    pairs = seen[0]
    assert pairs.shape == (3 * 12 * 4, 4, 3, 3)
    with torch.no_grad():
        for t in (0, 2):
            fs, fq = encoder(sx[t]), encoder(qx[t])
            for q in (0, 7):
                for n in range(4):
                    expected = torch.cat([fs[sy[t] == n].sum(0), fq[q]])   # [class sum, query]
                    assert torch.allclose(pairs[(t * 12 + q) * 4 + n], expected)
                    assert torch.allclose(scores[t, q, n], net.relation_module.linear(
                        expected.flatten()).sigmoid()[0])
    loss = net(sx, sy, qx, qy)
    onehot = F.one_hot(qy, 4).to(torch.float64)
    assert torch.allclose(loss, ((scores - onehot) ** 2).mean())


def test_relation_networks_shapes():
    assert relation_feature_size(28) == 5 and relation_feature_size(84) == 19
    assert relation_feature_size(8, padding=1) == 2
    encoder = relation_encoder(1, 64)
    assert encoder(torch.rand(2, 1, 28, 28)).shape == (2, 64, 5, 5)
    module = relation_module(64, 5, 8)
    assert module(torch.rand(3, 128, 5, 5)).shape == (3, 1)
    net = fastmeta.RelationNet.build(1, 28)
    sx, qx = torch.rand(2, 5, 1, 28, 28), torch.rand(2, 10, 1, 28, 28)
    sy = torch.arange(5).repeat(2, 1)
    assert net.predict(sx, sy, qx).shape == (2, 10, 5)
    with pytest.raises(ValueError, match="too small"):
        relation_feature_size(4)
    with pytest.raises(ValueError, match="feature maps"):
        fastmeta.RelationNet(linear_encoder(), relation_module()).predict(*episode()[:3])


def test_relationnet_learns_digits(digits):
    train_set, _ = digits
    net = fastmeta.RelationNet.build(1, 8, hidden=16, relation_hidden=8)
    held_out = TaskSampler(train_set, 5, 1, 10, 16, seed=99).sample()
    net.train()
    before, _ = evaluate(net, held_out)
    train(net, TaskSampler(train_set, 5, 1, 10, 4, seed=0), 30, 3e-3)
    after, acc = evaluate(net, held_out)
    assert after < 0.8 * before, (before, after)


@pytest.mark.parametrize("make", [
    lambda: fastmeta.ProtoNet(linear_encoder()),
    # (the checks come before the encoder runs: any modules do)
    lambda: fastmeta.RelationNet(linear_encoder(), nn.Linear(12, 1).double()),
], ids=["protonet", "relationnet"])
def test_metric_learners_refuse_bad_episodes_clearly(make):
    learner = make()
    sx, sy, qx, qy = episode()
    with pytest.raises(ValueError, match="query_y is required"):
        learner(sx, sy, qx, None)
    huge = sy.clone()
    huge[0, 0] = 10 ** 12  # (checked before any one-hot of that width is made)
    with pytest.raises(ValueError, match="support_y holds label 1000000000000 but a task has only 8"):
        learner(sx, huge, qx, qy)


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
def test_protonet_refuses_an_encoder_without_features():
    sx, sy, qx, qy = episode()
    with pytest.raises(ValueError, match="at least one per sample"):
        fastmeta.ProtoNet(nn.Linear(5, 0).double())(sx, sy, qx, qy)
