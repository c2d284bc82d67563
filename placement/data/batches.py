"""Tokenised examples into batches, and examples into disjoint train, validation and test splits."""
from __future__ import annotations

import json
import random
import warnings
from dataclasses import dataclass
from typing import NamedTuple

import torch

from .examples import IGNORE, Example, prompt_ids, render
from .records import DataError


@dataclass
class Batch:
    """Right-padded tensors; labels are aligned with input_ids (not shifted) and -100 where not a target."""

    input_ids: torch.LongTensor  # (B, T)
    attention_mask: torch.LongTensor  # (B, T)
    labels: torch.LongTensor  # (B, T)

    def target_tokens(self) -> int:
        """Target tokens after the causal shift, i.e. those the loss is taken over."""
        return int((self.labels[:, 1:] != IGNORE).sum())

    def to(self, device) -> "Batch":
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device))

    def share(self, rank: int, world: int) -> "Batch":
        """This rank's rows of a global batch (rows rank, rank + world, ...)."""
        return Batch(self.input_ids[rank::world], self.attention_mask[rank::world], self.labels[rank::world])


def pad_token_id(tokenizer) -> int:
    # Padding is masked out of attention and loss, so any valid id works when a tokenizer names none.
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def collate(rendered: list[tuple[list[int], list[int]]], pad_id: int) -> Batch:
    width = max(len(ids) for ids, _ in rendered)
    shape = (len(rendered), width)
    input_ids = torch.full(shape, pad_id, dtype=torch.long)
    attention_mask = torch.zeros(shape, dtype=torch.long)
    labels = torch.full(shape, IGNORE, dtype=torch.long)
    for row, (ids, labs) in enumerate(rendered):
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, : len(ids)] = 1
        labels[row, : len(labs)] = torch.tensor(labs, dtype=torch.long)
    return Batch(input_ids, attention_mask, labels)


def make_batches(
    tokenizer, examples: list[Example], *, batch_size: int, batches: int, max_length: int, seed: int = 0
) -> list[Batch]:
    """`batches` full batches of `batch_size` examples, drawn in a seeded order; examples without targets are skipped.

    Batches are never partial: every batch weighs the same in per-batch statistics.
    """
    if batches < 1:
        raise DataError(f"--batches {batches} asks for nothing: --batches must be at least 1")
    if batch_size < 1:
        raise DataError(f"--batch-size {batch_size} is empty: --batch-size must be at least 1")
    if not examples:
        raise DataError("no examples to batch: pass data with at least one record")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    wanted = batches * batch_size
    rendered = []
    for index in order:  # rendering stops once there is enough, so large data sets cost only what is used
        item = render(tokenizer, examples[index], max_length)
        if item is not None:
            rendered.append(item)
            if len(rendered) == wanted:
                break
    if not rendered:
        raise DataError(f"--max-length {max_length} leaves no target tokens in any example: raise --max-length")
    full = len(rendered) // batch_size
    if full == 0:
        raise DataError(
            f"only {len(rendered)} examples have target tokens, fewer than --batch-size {batch_size}: "
            "lower --batch-size or add data"
        )
    if full < batches:
        warnings.warn(f"only {len(rendered)} usable examples: making {full} batches of {batch_size}, not {batches}")
    pad_id = pad_token_id(tokenizer)
    return [collate(rendered[i * batch_size:(i + 1) * batch_size], pad_id) for i in range(full)]


# -- splitting -----------------------------------------------------------------------------------------------------
def prompt_key(example: Example) -> str:
    """The text that decides whether two examples ask the same thing."""
    if example.prompt is None:
        return example.text or ""
    return json.dumps(example.prompt, sort_keys=True, ensure_ascii=False)


def held_out_sizes(distinct: int, test: int | None, validation: int | None) -> tuple[int, int]:
    """Test and validation sizes for `distinct` prompts. What the user set is kept; what they did not is sized to the
    data: 10% each (capped at 100 test and 64 validation), at least one each while training keeps at least one
    example, none when it would not."""
    def share(cap: int, left: int) -> int:
        n = min(cap, max(1, distinct // 10))
        return n if left - n >= 1 else 0

    if test is None:
        test = share(100, distinct - (validation or 0))
    if validation is None:
        validation = share(64, distinct - test)
    return test, validation


def split_examples(
    examples: list[Example], *, test: int | None, validation: int | None, seed: int
) -> tuple[list[Example], list[Example], list[Example]]:
    """(train, validation, test): disjoint, one example per distinct prompt, in a seeded order. A size of None is
    sized to the data (`held_out_sizes`).

    Keeping one copy of each prompt means a question can never be trained on and then scored.
    """
    if (test or 0) < 0 or (validation or 0) < 0:
        raise DataError(f"--test {test} and --validation {validation} must not be negative")
    unique: dict[str, Example] = {}
    for example in examples:
        unique.setdefault(prompt_key(example), example)
    test, validation = held_out_sizes(len(unique), test, validation)
    if test + validation >= len(unique):
        raise DataError(
            f"--test {test} plus --validation {validation} leaves none of {len(unique)} distinct prompts "
            "for training: lower them or add data"
        )
    keys = list(unique)
    random.Random(seed).shuffle(keys)
    chosen = [unique[k] for k in keys]
    return chosen[test + validation:], chosen[test:test + validation], chosen[:test]


class _Rendered(NamedTuple):
    """A rendered split and what it was rendered from. It holds the tokenizer and the examples, so the ids of the
    example objects it compares by cannot pass to other objects while it lives."""

    tokenizer: object
    template: str | None
    max_length: int
    examples: list
    ids: tuple
    rendered: list

    def renders(self, tokenizer, examples: list, max_length: int) -> bool:
        """The same tokenizer object and template, the same cut, the same example objects in the same order."""
        return (self.tokenizer is tokenizer and self.template == getattr(tokenizer, "chat_template", None)
                and self.max_length == max_length and self.ids == tuple(map(id, examples)))


# The split rendered last: the studies train many runs (trials, arms, sites) on one training split, and rendering
# thousands of chat templates cost more than a short run's training. One entry, so the memory is one split's.
_LAST_RENDERED: list[_Rendered] = []


def _render_all(tokenizer, examples: list[Example], max_length: int) -> list[tuple[list[int], list[int]]]:
    if _LAST_RENDERED and _LAST_RENDERED[0].renders(tokenizer, examples, max_length):
        return _LAST_RENDERED[0].rendered
    rendered = [item for item in (render(tokenizer, e, max_length) for e in examples) if item is not None]
    if not rendered:
        raise DataError(f"--max-length {max_length} leaves no target tokens in any example: raise --max-length")
    _LAST_RENDERED[:] = [_Rendered(tokenizer, getattr(tokenizer, "chat_template", None), max_length, list(examples),
                                   tuple(map(id, examples)), rendered)]
    return rendered


def training_batches(
    tokenizer, examples: list[Example], *, steps: int, batch_size: int, max_length: int, seed: int = 0
) -> list[Batch]:
    """One full batch per training step, epoch after epoch, each epoch in its own seeded order.

    The sequence depends only on the examples and the seed, so every arm of a comparison sees the same data in the
    same order, and a resumed run picks up at its step index.
    """
    if steps < 1:
        raise DataError(f"--steps {steps} trains nothing: pass at least 1")
    if batch_size < 1:
        raise DataError(f"--batch-size {batch_size} is empty: --batch-size must be at least 1")
    rendered = _render_all(tokenizer, examples, max_length)
    if len(rendered) < batch_size:
        raise DataError(
            f"only {len(rendered)} training examples have target tokens, fewer than --batch-size {batch_size}: "
            "lower --batch-size or add data"
        )
    pad_id = pad_token_id(tokenizer)
    per_epoch = len(rendered) // batch_size
    batches, epoch = [], 0
    while len(batches) < steps:
        order = list(range(len(rendered)))
        random.Random(seed * 100_003 + epoch).shuffle(order)
        for i in range(min(per_epoch, steps - len(batches))):
            batches.append(collate([rendered[j] for j in order[i * batch_size:(i + 1) * batch_size]], pad_id))
        epoch += 1
    return batches


def eval_batches(tokenizer, examples: list[Example], *, batch_size: int, max_length: int) -> list[Batch]:
    """Every example with a target, in the given order; the last batch may be partial."""
    rendered = _render_all(tokenizer, examples, max_length)
    pad_id = pad_token_id(tokenizer)
    return [collate(rendered[i:i + batch_size], pad_id) for i in range(0, len(rendered), batch_size)]


def left_padded_prompts(tokenizer, examples: list[Example]) -> tuple[torch.LongTensor, torch.LongTensor]:
    """Prompt ids padded on the left, as generation needs: every row's next token comes at the same position."""
    prompts = [prompt_ids(tokenizer, e) for e in examples]
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_token_id(tokenizer), dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, ids in enumerate(prompts):
        input_ids[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, width - len(ids):] = 1
    return input_ids, attention_mask


def task_splits(
    examples: list[Example], eval_examples: list[Example] | None = None, *, test: int | None = None,
    validation: int | None = None, seed: int = 0,
) -> tuple[list[Example], list[Example], list[Example]]:
    """(train, validation, test) for a training run. Without `eval_examples` all three are held out from `examples`;
    with them, the test split is up to `test` distinct prompts of `eval_examples` (all when `test` is None), and every
    training example asking one of those prompts is dropped, so no test question is ever trained on. Sizes left None
    are sized to the data (`held_out_sizes`)."""
    if eval_examples is None:
        return split_examples(examples, test=test, validation=validation, seed=seed)
    held: dict[str, Example] = {}
    for example in eval_examples:
        held.setdefault(prompt_key(example), example)
    keys = list(held)
    random.Random(seed).shuffle(keys)
    keys = keys[:test] if test is not None else keys
    if not keys:
        raise DataError("the evaluation data holds no usable example: pass --eval-data with records, or a positive --test")
    excluded = set(keys)
    pool = [e for e in examples if prompt_key(e) not in excluded]
    train, val, _ = split_examples(pool, test=0, validation=validation, seed=seed)
    return train, val, [held[k] for k in keys]


def load_splits(data: str, eval_data: str | None, test: int | None, validation: int | None, seed: int):
    """(train, validation, test) examples of a training run's data sources (see `task_splits`)."""
    from .examples import load_examples

    if test is not None and test < 1:
        raise DataError(f"--test {test} leaves nothing to evaluate on: pass at least 1")
    held = load_examples(eval_data, seed) if eval_data else None
    splits = task_splits(load_examples(data, seed), held, test=test, validation=validation, seed=seed)
    if not splits[2]:
        raise DataError(f"{data} has too few distinct prompts to hold out a test example: add data or pass --eval-data")
    return splits
