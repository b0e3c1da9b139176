"""How much room the digits main job leaves above its baselines: 5-way 1-shot accuracy of
nearest-neighbour classifiers on the test classes (digits 6-9 and their rotations).

- pixels: 1-nearest-neighbour in pixel space, on the CLI's own 600 test tasks;
- oracle: 1-nearest-neighbour on the features of the digits network trained as a 16-way
  classifier on half of the *test* classes' images, on tasks drawn from the other half (what
  a representation could reach if the training classes taught everything the test classes
  need; no method here may train on test classes);
- with a checkpoint (``fastmeta train`` on digits): its accuracy on the CLI's test tasks and
  which pairs of test classes its errors fall between.

    python benchmarks/digits_headroom.py [runs/digits-maml/checkpoint.pt]
"""
from __future__ import annotations

import argparse
import itertools

import torch
import torch.nn.functional as F

from fastmeta.data import ClassDataset, TaskSampler
from fastmeta.experiments import classification as C
from fastmeta.stats import format_ci, mean_ci

TASKS, ORACLE_STEPS, BATCH = 600, 1500, 64


def nearest_neighbour_accuracy(features, tasks) -> torch.Tensor:
    """Per-task query accuracy of 1-NN on ``features(images)`` (1-shot: a prototype each)."""
    support, query = features(tasks.support_x), features(tasks.query_x)
    guess = tasks.support_y.gather(1, torch.cdist(query, support).argmin(-1))
    return (guess == tasks.query_y).double().mean(1)


def flat(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(2)


def oracle(config: dict, test: ClassDataset, seed: int = 0) -> torch.Tensor:
    """Per-task accuracy of 1-NN on features trained on half of the test classes' images."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(test.labels), generator=generator)
    seen, unseen = order[: len(order) // 2], order[len(order) // 2:]
    torch.manual_seed(seed)
    model = C.network(config, test.image_shape, test.num_classes)
    optimizer = torch.optim.Adam(model.parameters(), 1e-3)
    images, labels = test.images, test.labels
    for _ in range(ORACLE_STEPS):
        batch = seen[torch.randint(len(seen), (BATCH,), generator=generator)]
        loss = F.cross_entropy(model(images[batch]), labels[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    body = model[:-1]   # everything before the classifier's last Linear layer

    def features(x: torch.Tensor) -> torch.Tensor:
        return F.normalize(body(x.flatten(0, 1)), dim=-1).unflatten(0, x.shape[:2])

    held_out = ClassDataset(images[unseen], labels[unseen], test.num_classes)
    tasks = TaskSampler(held_out, config["ways"], 1, config["eval_queries"], TASKS,
                        seed=seed).sample()
    with torch.no_grad():
        return nearest_neighbour_accuracy(features, tasks)


def confusions(config: dict, splits, checkpoint: str) -> tuple[torch.Tensor, list[tuple]]:
    """The checkpoint's per-task accuracy on the CLI's test tasks, and its errors' share per
    unordered pair of test classes (largest first)."""
    state = torch.load(checkpoint, weights_only=False)
    _, learner = C.build(state["config"], splits.train.image_shape)
    learner.load_state_dict(state["algorithm"])
    sampler = TaskSampler(splits.test, config["ways"], config["shots"], config["eval_queries"],
                          C.EVAL_CHUNK, seed=C.TEST_SEED)
    errors = torch.zeros(splits.test.num_classes, splits.test.num_classes)
    per_task, left = [], TASKS
    while left > 0:
        tasks = sampler.sample(min(C.EVAL_CHUNK, left))
        left -= C.EVAL_CHUNK
        scores = C.predict(learner, tasks.support_x, tasks.support_y, tasks.query_x,
                           state["config"]["eval_steps"])
        per_task.append(C.task_accuracy(scores, tasks.query_y))
        guess = scores.argmax(-1)
        classes = sampler.last_classes
        truth, said = classes.gather(1, tasks.query_y), classes.gather(1, guess)
        errors.index_put_((truth.flatten(), said.flatten()), torch.ones(truth.numel()),
                          accumulate=True)
    errors.fill_diagonal_(0)
    names = splits.test.class_names
    pairs = [(float(errors[i, j] + errors[j, i]) / float(errors.sum()), names[i], names[j])
             for i, j in itertools.combinations(range(len(names)), 2)]
    return torch.cat(per_task), sorted(pairs, reverse=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", nargs="?", help="a digits run's checkpoint.pt")
    args = parser.parse_args()
    config = C.make_config({})
    splits = C.load_splits(config)
    chunks, _ = C.test_tasks(config, splits, TASKS, C.TEST_SEED, torch.device("cpu"))
    rows = [("pixels, 1-NN (the CLI's test tasks)",
             torch.cat([nearest_neighbour_accuracy(flat, c) for c in chunks])),
            ("oracle features, 1-NN (held-out test images)", oracle(config, splits.test))]
    pairs = []
    if args.checkpoint:
        accuracy, pairs = confusions(config, splits, args.checkpoint)
        rows.append((f"{args.checkpoint} (the CLI's test tasks)", accuracy))
    print(f"5-way 1-shot accuracy on digits' test classes, {TASKS} tasks, mean ± 95% CI")
    for name, accuracy in rows:
        print(f"  {name:<58} {format_ci(*mean_ci(accuracy))}")
    if pairs:
        print("  its errors, by pair of test classes (share of all errors):")
        for share, a, b in pairs[:8]:
            print(f"    {a:>9} vs {b:<9} {share:.1%}")


if __name__ == "__main__":
    main()
