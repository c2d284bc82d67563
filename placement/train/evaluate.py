"""Evaluate a model, adapted or not, on held-out examples: token loss, and exact match by greedy generation."""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
from peft import PeftType
from tqdm.auto import tqdm

from .. import data as data_mod
from ..families import adapters
from ..model.loss import example_losses
from . import answers

END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>")


@dataclass
class Evaluation:
    eval_loss: float
    exact_match: float | None = None
    balanced_accuracy: float | None = None
    outputs: list[str] = field(default_factory=list)
    predictions: list[str | None] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)  # mean target-token loss per example (NaN: no target)
    correct: list[bool] = field(default_factory=list)  # per example, when answers are scored


def task_kind(examples: list) -> str | None:
    """The answer kind of a task (boolean, choice, number, text), or None when its examples carry no answers."""
    golds = [e.answer for e in examples if e.answer is not None]
    if not golds or len(golds) < len(examples):
        return None
    return answers.answer_kind(golds)


@torch.no_grad()
def mean_loss(model, tokenizer, examples: list, *, batch_size: int = 16, max_length: int = 256) -> float:
    """Cross-entropy per target token over all `examples`, each token weighing the same."""
    return per_example_loss(model, tokenizer, examples, batch_size=batch_size, max_length=max_length)[1]


@torch.no_grad()
def per_example_loss(model, tokenizer, examples: list, *, batch_size: int = 16, max_length: int = 256
                     ) -> tuple[list[float], float]:
    """(mean target-token loss of each example, in order; NaN for one whose targets the cut removed, the
    token-weighted mean over all), from one pass."""
    device = next(model.parameters()).device
    rendered = [data_mod.render(tokenizer, e, max_length) for e in examples]
    kept = [i for i, item in enumerate(rendered) if item is not None]
    if not kept:
        raise data_mod.DataError(f"--max-length {max_length} leaves no target tokens in any example: raise --max-length")
    losses, total, count = [float("nan")] * len(examples), 0.0, 0
    pad = data_mod.pad_token_id(tokenizer)
    for start in range(0, len(kept), batch_size):
        rows = kept[start:start + batch_size]
        sums, counts = example_losses(model, data_mod.collate([rendered[i] for i in rows], pad).to(device))
        for i, s, c in zip(rows, sums.tolist(), counts.tolist()):
            losses[i] = s / c if c else float("nan")
            total, count = total + s, count + c
    return losses, total / max(count, 1)


def stop_ids(tokenizer) -> list[int]:
    """Generation ends at the end-of-sequence token or at an end-of-turn token the vocabulary knows."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    vocab = tokenizer.get_vocab()
    ids.update(vocab[t] for t in END_OF_TURN if t in vocab)
    return sorted(ids)


@torch.no_grad()
def generate(model, tokenizer, examples: list, *, batch_size: int = 16, max_new_tokens: int = 32,
             progress: bool = False, max_length: int | None = None) -> list[str]:
    """Greedy completions of each example's prompt, without the prompt and without special tokens. A prompt longer
    than the model's context (less the new tokens), or than `max_length` when given, keeps its last tokens (the
    question's end and the turn marker): a megabyte record costs what a long one does, never a hang."""
    from transformers import GenerationConfig

    stops = stop_ids(tokenizer)
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stops,
                              pad_token_id=data_mod.pad_token_id(tokenizer))
    device = next(model.parameters()).device
    outputs = []
    decode = functools.partial(greedy_prefix, model) if drops_prefix_in_generate(model) else model.generate
    chunks = range(0, len(examples), batch_size)
    for start in tqdm(chunks, desc="generating", disable=not progress):
        input_ids, attention_mask = data_mod.left_padded_prompts(tokenizer, examples[start:start + batch_size])
        window = _prompt_window(model, max_new_tokens, max_length)
        if window is not None:  # rows are left-padded: the last columns hold every row's end
            input_ids, attention_mask = input_ids[:, -window:], attention_mask[:, -window:]
        new = decode(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                     generation_config=config)[:, input_ids.shape[1]:]
        outputs.extend(tokenizer.batch_decode(new, skip_special_tokens=True))
    return outputs


def _prompt_window(model, max_new_tokens: int, max_length: int | None) -> int | None:
    """How many prompt tokens generation keeps: `max_length`, else what the model's context leaves for the answer."""
    if max_length is not None:
        return max_length
    context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return max(1, context - max_new_tokens) if isinstance(context, int) else None


def drops_prefix_in_generate(model) -> bool:
    """Prefix tuning under PEFT 0.21 and transformers 5: PEFT's `generate` hands the virtual keys and values to the
    model as `past_key_values`, which the model ignores for the `cache` transformers 5 passes, so generation runs
    the base model alone (first-token logits equal the base model's, while PEFT's forward, which the loss uses, is
    right). Such a model is decoded by `greedy_prefix`."""
    config = getattr(model, "active_peft_config", None)
    return getattr(config, "peft_type", None) == PeftType.PREFIX_TUNING


def greedy_prefix(model, *, input_ids, attention_mask, generation_config, use_cache: bool = True) -> torch.Tensor:
    """Greedy decoding of a prefix-tuned PEFT model, returned as `generate` returns it: the prompt, then each row's
    new tokens up to and including a stop token, then padding. The prompt goes through PEFT's forward, which puts
    the prefix in front of it in the KV cache; each new token then goes through the base model with that cache and
    an attention mask that keeps the prefix's columns. Positions follow the cache (the prompt's start after the
    prefix, as in PEFT's forward). `use_cache=False` runs PEFT's forward on the whole sequence at every step: the
    reference the cached loop is tested against."""
    stops = torch.tensor(generation_config.eos_token_id, device=input_ids.device).reshape(-1)
    done = torch.zeros(len(input_ids), dtype=torch.bool, device=input_ids.device)
    prefix = torch.ones(len(input_ids), model.active_peft_config.num_virtual_tokens, dtype=attention_mask.dtype,
                        device=attention_mask.device)
    out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=use_cache, logits_to_keep=1)
    for _ in range(generation_config.max_new_tokens):
        token = torch.where(done, generation_config.pad_token_id, out.logits[:, -1].argmax(-1))
        input_ids = torch.cat([input_ids, token[:, None]], dim=1)
        attention_mask = torch.cat([attention_mask, (~done)[:, None].to(attention_mask.dtype)], dim=1)
        done |= torch.isin(token, stops)
        if done.all():
            break
        if use_cache:
            mask = torch.cat([prefix, attention_mask], dim=1)  # the cache holds the prefix first
            out = model.get_base_model()(input_ids=token[:, None], attention_mask=mask,
                                         cache=out.cache, use_cache=True, logits_to_keep=1)
        else:
            out = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=1)
    return input_ids


def evaluate(model, tokenizer, examples: list, *, kind: str | None = None, batch_size: int = 16,
             max_length: int = 256, max_new_tokens: int = 32, progress: bool = False) -> Evaluation:
    """Held-out loss always; exact match (and balanced accuracy for yes/no and multiple choice) when answers exist."""
    model.eval()
    with adapters.quiet():
        return _evaluate(model, tokenizer, examples, kind, batch_size, max_length, max_new_tokens, progress)


def _evaluate(model, tokenizer, examples, kind, batch_size, max_length, max_new_tokens, progress) -> Evaluation:
    losses, mean = per_example_loss(model, tokenizer, examples, batch_size=batch_size, max_length=max_length)
    result = Evaluation(mean, losses=losses)
    kind = kind or task_kind(examples)
    if kind is None:
        return result
    golds = [e.answer for e in examples]
    result.outputs = generate(model, tokenizer, examples, batch_size=batch_size, max_new_tokens=max_new_tokens,
                              progress=progress)
    result.predictions = [answers.extract(o, kind) for o in result.outputs]
    result.exact_match = answers.exact_match(result.outputs, golds, kind)
    result.correct = [answers.is_correct(o, g, kind) for o, g in zip(result.outputs, golds)]
    if kind in ("boolean", "choice"):
        result.balanced_accuracy = answers.balanced_accuracy(result.predictions, golds, kind)
    return result


def majority_baseline(train_examples: list, test_examples: list, kind: str) -> Evaluation:
    """Always answer the most common training answer: the floor a yes/no or multiple-choice score must clear."""
    answer = answers.majority_answer([e.answer for e in train_examples if e.answer is not None], kind)
    golds = [e.answer for e in test_examples]
    always = [answer] * len(golds)  # the output and its extracted prediction are the same string
    return Evaluation(float("nan"), answers.exact_match(always, golds, kind),
                      answers.balanced_accuracy(always, golds, kind), always, always)


def predictions_frame(examples: list, evaluation: Evaluation):
    """One row per test example; without answers nothing was generated and output and prediction stay empty."""
    import pandas as pd

    blank = [None] * len(examples)
    return pd.DataFrame({
        "prompt": [e.prompt[-1]["content"] if e.prompt else (e.text or "") for e in examples],
        "answer": [e.answer for e in examples],
        "output": evaluation.outputs or blank,
        "prediction": evaluation.predictions or blank,
        "correct": evaluation.correct or blank,
        "loss": evaluation.losses or blank,
    })


def skipped_exact_match(examples: list) -> str | None:
    """Why exact match is not scored on these test examples, or None when it is."""
    if task_kind(examples) is not None:
        return None
    if any(e.prompt is None for e in examples):
        return "plain-text records have no prompt to answer"
    return "not every test record has an answer field"
